//! A simulated, fault-injecting file system for the deterministic storage fault simulation.
//!
//! Test builds only (`cfg(any(test, feature = "failpoints"))`): the release binary has none
//! of it. [`SimFs`] implements [`Storage`] in memory and keeps, per file, the bytes written
//! and the bytes durable (as of the last successful fsync), and per directory the entries as
//! seen and as durable (as of the last directory fsync). Driven by one seed, it
//!
//! * fails any operation with EIO or ENOSPC,
//! * writes only part of a buffer (a short write, or part then an error),
//! * on [`SimFs::crash`] keeps the durable state plus a random prefix of each unsynced tail
//!   (torn writes), and forgets creates/renames/removes no directory fsync covered,
//! * corrupts one byte of what a read returns (at most once per simulated process).
//!
//! It also watches the callers: a file handle used again after one of its operations failed,
//! or any fsync after an fsync failed in the same process, is recorded as a violation (an
//! fsync error must stop the engine, never be retried). Operations happen in one order when
//! the harness drives the engine in lockstep, so a seed replays exactly.

use crate::storage::{Storage, StorageFile};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// SplitMix64: small, deterministic, good enough to pick faults.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True once in `n` (never when `n` is 0).
    pub fn one_in(&mut self, n: u64) -> bool {
        n > 0 && self.below(n) == 0
    }
}

/// The kinds of operation, for fault decisions and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Create,
    Write,
    Fsync,
    Read,
    Truncate,
    Rename,
    Remove,
    DirFsync,
    List,
}

#[derive(Debug, Default, Clone)]
struct FileData {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug)]
struct Sim {
    rng: SimRng,
    /// A fault at one operation in this many (0: none).
    fault_one_in: u64,
    files: HashMap<u64, FileData>,
    next_inode: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// Faults injected, by "op/kind".
    injected: BTreeMap<String, u64>,
    violations: Vec<String>,
    /// Crashed: every operation fails until `crash` builds the next process's view.
    dead: bool,
    /// An fsync failed in this process.
    fsync_failed: bool,
    corrupt_read_done: bool,
    /// Errors returned in this process (the harness expects the engine to stop after one).
    errors_returned: u64,
    ops: u64,
}

/// The simulated file system; clones share it.
#[derive(Debug, Clone)]
pub struct SimFs(Arc<Mutex<Sim>>);

enum Fault {
    Eio,
    Enospc,
    /// Part of the buffer, then an error.
    Partial,
    /// Part of the buffer, no error (the caller must write the rest).
    Short,
    CorruptRead,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}
fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Sim {
    fn count(&mut self, op: Op, kind: &str) {
        *self.injected.entry(format!("{op:?}/{kind}")).or_default() += 1;
    }

    /// Decides whether `op` fails now, and how.
    fn decide(&mut self, op: Op) -> Option<Fault> {
        self.ops += 1;
        if !self.rng.one_in(self.fault_one_in) {
            return None;
        }
        let roll = self.rng.below(4);
        let fault = match op {
            Op::Write => match roll {
                0 => Fault::Eio,
                1 => Fault::Enospc,
                2 => Fault::Partial,
                _ => Fault::Short,
            },
            Op::Read if roll >= 2 && !self.corrupt_read_done => Fault::CorruptRead,
            Op::Create | Op::Fsync | Op::DirFsync | Op::Truncate if roll % 2 == 1 => Fault::Enospc,
            _ => Fault::Eio,
        };
        let kind = match fault {
            Fault::Eio => "EIO",
            Fault::Enospc => "ENOSPC",
            Fault::Partial => "partial",
            Fault::Short => "short",
            Fault::CorruptRead => "corrupt",
        };
        self.count(op, kind);
        Some(fault)
    }

    fn fail(&mut self, op: Op, error: io::Error) -> io::Error {
        self.errors_returned += 1;
        if matches!(op, Op::Fsync | Op::DirFsync) {
            self.fsync_failed = true;
        }
        error
    }

    /// Common start of every operation: a dead process fails; an fsync after a failed one is
    /// a violation.
    fn begin(&mut self, op: Op) -> io::Result<()> {
        if self.dead {
            return Err(eio());
        }
        if matches!(op, Op::Fsync | Op::DirFsync) && self.fsync_failed {
            self.violations
                .push(format!("{op:?} after an fsync failed in the same process"));
        }
        Ok(())
    }

    /// A plain error fault for operations that have no partial form.
    fn simple(&mut self, op: Op) -> io::Result<()> {
        self.begin(op)?;
        match self.decide(op) {
            None | Some(Fault::Short) | Some(Fault::CorruptRead) => Ok(()),
            Some(Fault::Enospc) => Err(self.fail(op, enospc())),
            Some(Fault::Eio) | Some(Fault::Partial) => Err(self.fail(op, eio())),
        }
    }
}

/// A file handle of the simulation.
struct SimFile {
    sim: Arc<Mutex<Sim>>,
    inode: u64,
    path: PathBuf,
    failed: bool,
}

impl SimFile {
    fn check_usable(&self, sim: &mut Sim, op: Op) {
        if self.failed {
            sim.violations.push(format!(
                "{op:?} on {} after an operation on the same file failed",
                self.path.display()
            ));
        }
    }
}

impl StorageFile for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let sim = self.sim.clone();
        let mut sim = sim.lock().expect("sim lock");
        sim.begin(Op::Write)?;
        self.check_usable(&mut sim, Op::Write);
        let fault = sim.decide(Op::Write);
        let part = if buf.len() > 1 {
            1 + sim.rng.below(buf.len() as u64 - 1) as usize
        } else {
            0
        };
        let inode = self.inode;
        let file = sim.files.get_mut(&inode).expect("open file exists");
        match fault {
            None | Some(Fault::CorruptRead) => {
                file.data.extend_from_slice(buf);
                Ok(buf.len())
            }
            Some(Fault::Short) if part > 0 => {
                file.data.extend_from_slice(&buf[..part]);
                Ok(part)
            }
            Some(Fault::Short) => {
                file.data.extend_from_slice(buf);
                Ok(buf.len())
            }
            Some(Fault::Partial) => {
                file.data.extend_from_slice(&buf[..part]);
                self.failed = true;
                Err(sim.fail(Op::Write, enospc()))
            }
            Some(Fault::Enospc) => {
                self.failed = true;
                Err(sim.fail(Op::Write, enospc()))
            }
            Some(Fault::Eio) => {
                self.failed = true;
                Err(sim.fail(Op::Write, eio()))
            }
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.sync_all()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        let sim = self.sim.clone();
        let mut sim = sim.lock().expect("sim lock");
        sim.begin(Op::Fsync)?;
        self.check_usable(&mut sim, Op::Fsync);
        match sim.simple_decide_fsync() {
            Ok(()) => {
                let file = sim.files.get_mut(&self.inode).expect("open file exists");
                file.durable = file.data.clone();
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}

impl Sim {
    fn simple_decide_fsync(&mut self) -> io::Result<()> {
        match self.decide(Op::Fsync) {
            None | Some(Fault::Short) | Some(Fault::CorruptRead) => Ok(()),
            Some(Fault::Enospc) => Err(self.fail(Op::Fsync, enospc())),
            Some(_) => Err(self.fail(Op::Fsync, eio())),
        }
    }
}

/// What the simulation did, for the harness's report.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub injected: BTreeMap<String, u64>,
    pub violations: Vec<String>,
    pub ops: u64,
}

impl SimFs {
    /// An empty file system; a fault at one operation in `fault_one_in` (0: never).
    pub fn new(seed: u64, fault_one_in: u64) -> SimFs {
        SimFs(Arc::new(Mutex::new(Sim {
            rng: SimRng::new(seed),
            fault_one_in,
            files: HashMap::new(),
            next_inode: 1,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            injected: BTreeMap::new(),
            violations: Vec::new(),
            dead: false,
            fsync_failed: false,
            corrupt_read_done: false,
            errors_returned: 0,
            ops: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        self.0.lock().expect("sim lock")
    }

    /// Turns fault injection on or off (`fault_one_in` 0: off).
    pub fn set_fault_rate(&self, fault_one_in: u64) {
        self.lock().fault_one_in = fault_one_in;
    }

    /// Errors returned to callers since the last crash.
    pub fn errors_returned(&self) -> u64 {
        self.lock().errors_returned
    }

    /// The process dies now: every later operation fails (without a fault decision) until
    /// [`SimFs::crash`].
    pub fn kill(&self) {
        self.lock().dead = true;
    }

    /// The next process's view after a crash: durable entries and bytes, plus a random prefix
    /// of each unsynced tail. Returns the unsynced bytes lost.
    pub fn crash(&self) -> u64 {
        let mut sim = self.lock();
        let sim = &mut *sim;
        sim.names = sim.durable_names.clone();
        let live: std::collections::HashSet<u64> = sim.names.values().copied().collect();
        sim.files.retain(|inode, _| live.contains(inode));
        let mut lost = 0u64;
        let mut inodes: Vec<u64> = sim.files.keys().copied().collect();
        inodes.sort_unstable();
        for inode in inodes {
            let file = sim.files.get_mut(&inode).expect("listed");
            let appended = file.data.len() > file.durable.len()
                && file.data[..file.durable.len()] == file.durable[..];
            let keep = if appended && sim.rng.one_in(2) {
                sim.rng
                    .below((file.data.len() - file.durable.len()) as u64 + 1)
                    as usize
            } else {
                0
            };
            let mut next = file.durable.clone();
            if appended {
                next.extend_from_slice(&file.data[file.durable.len()..][..keep]);
                lost += (file.data.len() - next.len()) as u64;
            } else if file.data != file.durable {
                lost += file.data.len().abs_diff(file.durable.len()) as u64;
            }
            // What survived the crash is on disk now.
            file.data = next.clone();
            file.durable = next;
        }
        if lost > 0 {
            *sim.injected
                .entry("crash/unsynced_bytes_lost".into())
                .or_default() += lost;
        }
        *sim.injected.entry("crash/crashes".into()).or_default() += 1;
        sim.dead = false;
        sim.fsync_failed = false;
        sim.corrupt_read_done = false;
        sim.errors_returned = 0;
        lost
    }

    /// A fault-free copy of what a crash right now would leave if every unsynced byte were
    /// lost: what the harness checks completions against.
    pub fn durable_copy(&self) -> SimFs {
        let sim = self.lock();
        let mut files = HashMap::new();
        for inode in sim.durable_names.values() {
            let durable = sim.files[inode].durable.clone();
            files.insert(
                *inode,
                FileData {
                    data: durable.clone(),
                    durable,
                },
            );
        }
        SimFs(Arc::new(Mutex::new(Sim {
            rng: SimRng::new(0),
            fault_one_in: 0,
            files,
            next_inode: sim.next_inode,
            names: sim.durable_names.clone(),
            durable_names: sim.durable_names.clone(),
            injected: BTreeMap::new(),
            violations: Vec::new(),
            dead: false,
            fsync_failed: false,
            corrupt_read_done: false,
            errors_returned: 0,
            ops: 0,
        })))
    }

    pub fn report(&self) -> SimReport {
        let sim = self.lock();
        SimReport {
            injected: sim.injected.clone(),
            violations: sim.violations.clone(),
            ops: sim.ops,
        }
    }

    /// Leaks a clone for `EngineOptions::storage` (one small handle per engine start).
    pub fn leak(&self) -> &'static dyn Storage {
        Box::leak(Box::new(self.clone()))
    }
}

impl Storage for SimFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut sim = self.lock();
        sim.simple(Op::Create)?;
        let inode = match sim.names.get(path) {
            Some(inode) => {
                let inode = *inode;
                sim.files.get_mut(&inode).expect("named").data.clear();
                inode
            }
            None => {
                let inode = sim.next_inode;
                sim.next_inode += 1;
                sim.files.insert(inode, FileData::default());
                sim.names.insert(path.to_path_buf(), inode);
                inode
            }
        };
        Ok(Box::new(SimFile {
            sim: self.0.clone(),
            inode,
            path: path.to_path_buf(),
            failed: false,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut sim = self.lock();
        sim.begin(Op::Read)?;
        let fault = sim.decide(Op::Read);
        let Some(inode) = sim.names.get(path).copied() else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        let mut bytes = sim.files[&inode].data.clone();
        match fault {
            None | Some(Fault::Short) | Some(Fault::Partial) => Ok(bytes),
            Some(Fault::CorruptRead) => {
                if !bytes.is_empty() {
                    let at = sim.rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << sim.rng.below(8);
                }
                sim.corrupt_read_done = true;
                Ok(bytes)
            }
            Some(Fault::Enospc) | Some(Fault::Eio) => Err(sim.fail(Op::Read, eio())),
        }
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut sim = self.lock();
        sim.simple(Op::Truncate)?;
        let Some(inode) = sim.names.get(path).copied() else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        let file = sim.files.get_mut(&inode).expect("named");
        file.data.truncate(len as usize);
        file.durable = file.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.simple(Op::Rename)?;
        let inode = sim
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        sim.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.simple(Op::Remove)?;
        sim.names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.simple(Op::DirFsync)?;
        sim.durable_names = sim.names.clone();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        let mut sim = self.lock();
        sim.simple(Op::List)?;
        Ok(sim
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p.clone())))
            .collect())
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(self.read(path)?.len() as u64)
    }

    fn restrict_to_owner(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_synced_bytes_and_dir_synced_names_only() {
        let fs = SimFs::new(1, 0);
        let dir = Path::new("/d");
        let mut a = fs.create(&dir.join("a")).unwrap();
        a.write_all(b"durable").unwrap();
        a.sync_all().unwrap();
        fs.sync_dir(dir).unwrap();
        a.write_all(b"-unsynced").unwrap();
        let mut b = fs.create(&dir.join("b")).unwrap();
        b.write_all(b"never named durably").unwrap();
        b.sync_all().unwrap();
        fs.kill();
        assert!(
            fs.read(&dir.join("a")).is_err(),
            "a dead process reads nothing"
        );
        fs.crash();
        let a = fs.read(&dir.join("a")).unwrap();
        assert!(a.starts_with(b"durable") && b"durable-unsynced".starts_with(&a[..]));
        assert!(fs.read(&dir.join("b")).is_err());
        assert_eq!(fs.list(dir).unwrap().len(), 1);
    }

    #[test]
    fn an_fsync_after_a_failed_one_is_a_violation() {
        // Every operation fails: the first fsync fails, the second is a retry.
        let fs = SimFs::new(7, 1);
        fs.set_fault_rate(0);
        let mut f = fs.create(Path::new("/d/x")).unwrap();
        fs.set_fault_rate(1);
        assert!(f.sync_all().is_err());
        let _ = f.sync_all();
        let report = fs.report();
        assert!(!report.violations.is_empty(), "{report:?}");
    }
}
