//! WAL segment scanning: batches parse or stop with a reason; the torn-tail probe never
//! panics either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewardpool::wal;

fuzz_target!(|data: &[u8]| {
    let end = wal::scan(data, |b| {
        assert!(b.len_bytes > 0);
        Ok::<(), ()>(())
    });
    if let Ok(wal::ScanEnd::Damaged { offset, .. }) = end {
        let _ = wal::find_valid_batch_after(data, offset as usize);
    }
});
