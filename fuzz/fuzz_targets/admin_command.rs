//! Admin command parsing (`admin::parse_command`): any body gives a command or an error, never
//! a panic. What it accepts reads one way: the body is a JSON object within the size bound,
//! its `op` is the command's op, its `pool` the command's pool, and parsing again gives the
//! same command.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewardpool::admin;

const OPS: [&str; 7] = [
    "restock",
    "set_quantity",
    "set_weight",
    "add_item",
    "add_pool",
    "close_pool",
    "open_pool",
];

fuzz_target!(|data: &[u8]| {
    let Ok(command) = admin::parse_command(data) else {
        return;
    };
    assert!(data.len() <= 64 * 1024);
    assert!(OPS.contains(&command.op()));
    // A lenient parser reads the same op and pool from the same bytes.
    let value: serde_json::Value = serde_json::from_slice(data).expect("accepted body is JSON");
    assert_eq!(value["op"].as_str(), Some(command.op()));
    assert_eq!(value["pool"].as_str(), Some(command.pool()));
    assert_eq!(admin::parse_command(data), Ok(command));
});
