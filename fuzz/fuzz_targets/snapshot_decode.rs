//! Snapshot loading: any bytes give a state or an error, never a panic. Run on the input as
//! given and with its header line rebuilt for the body (length, CRC, seq: `fixup.rs`), so the
//! body's checks behind the CRC are fuzzed too. A loaded state conserves its stock.
#![no_main]
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = rewardpool::snapshot::decode(data, 1000) {
        state.assert_conserved();
    }
    if let Ok(state) = rewardpool::snapshot::decode(&fixup::snapshot(data), 1000) {
        state.assert_conserved();
    }
});
