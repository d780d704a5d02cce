//! WAL record decoding: any bytes give a record or an error, never a panic; a decoded record
//! encodes back to the bytes it came from. Run on the input as given and on a copy with every
//! record CRC recomputed (`fixup.rs`), so the field decoders behind the CRC are fuzzed too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewardpool::record;

mod fixup;

fn decode_all(data: &[u8]) {
    let mut at = 0;
    while at < data.len() {
        match record::decode(&data[at..]) {
            Ok((r, used)) => {
                assert!(used > 0 && used <= data.len() - at);
                let mut again = Vec::new();
                record::encode(&mut again, &r);
                assert_eq!(again, &data[at..at + used], "decode/encode round trip");
                at += used;
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    let mut fixed = data.to_vec();
    fixup::records(&mut fixed);
    decode_all(&fixed);
});
