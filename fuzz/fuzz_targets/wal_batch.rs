//! WAL segment scanning: batches parse or stop with a reason; the torn-tail probe never
//! panics either. Run on the input as given and on a copy with every batch and record CRC
//! recomputed (`fixup.rs`), so batch framing and record decoding behind the CRCs are fuzzed.
//! A parsed batch's records encode back to exactly its payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewardpool::{record, wal};

mod fixup;

fn scan(data: &[u8]) {
    let end = wal::scan(data, |b| {
        assert!(b.len_bytes as usize >= wal::BATCH_HEADER_BYTES);
        let start = b.offset as usize + wal::BATCH_HEADER_BYTES;
        let payload = &data[start..b.offset as usize + b.len_bytes as usize];
        let mut again = Vec::new();
        for r in &b.records {
            record::encode(&mut again, r);
        }
        assert_eq!(again, payload, "batch payload round trip");
        Ok::<(), ()>(())
    });
    if let Ok(wal::ScanEnd::Damaged { offset, .. }) = end {
        let _ = wal::find_valid_batch_after(data, offset as usize);
    }
}

fuzz_target!(|data: &[u8]| {
    scan(data);
    let mut fixed = data.to_vec();
    fixup::batches(&mut fixed);
    scan(&fixed);
});
