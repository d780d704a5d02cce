//! Config loading: any file content gives a config or an error, never a panic; a loaded
//! config has at least one pool.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(data).expect("write");
    if let Ok(config) = rewardpool::config::Config::load_with_env(Some(file.path()), &[]) {
        assert!(!config.pools.is_empty());
    }
});
