//! Config loading: any file content and any `REWARDPOOL__` overrides give a config or an
//! error, never a panic; a loaded config has at least one pool. Input: the file's text, then
//! optionally a line `#@env` followed by `NAME=value` lines (the environment overrides; they
//! stay in the file too, where they are a comment and what follows it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut env = Vec::new();
    if let Some(at) = data.windows(6).position(|w| w == b"\n#@env") {
        for line in String::from_utf8_lossy(&data[at + 6..]).lines() {
            if let Some((name, value)) = line.split_once('=') {
                env.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(data).expect("write");
    if let Ok(config) = rewardpool::config::Config::load_with_env(Some(file.path()), &env) {
        assert!(!config.pools.is_empty());
    }
});
