//! The file operations under the WAL writer, the snapshotter and recovery, as a seam.
//!
//! Everything durable goes through [`Storage`]: create, write, fsync, rename, directory
//! fsync, read, list, remove, truncate. The real implementation ([`REAL`], the default
//! everywhere) is a thin wrapper over `std::fs`; it is chosen once (a `&'static dyn Storage`
//! in `EngineOptions`, or the `*_in` function variants) and costs one indirect call per
//! write or fsync — nothing next to the system call itself (`cargo bench --bench engine`).
//!
//! The seam exists for the deterministic storage fault simulation (`sim_fs.rs`, test builds
//! only): EIO / ENOSPC at any operation, short and partial writes, the unsynced tail lost on
//! a simulated crash, a byte corrupted on read.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file open for appending, as the WAL writer and the snapshotter use it.
pub trait StorageFile: Send {
    /// One `write`: may write fewer bytes than given (then call again).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`.
    fn sync_all(&mut self) -> io::Result<()>;

    /// Writes the whole buffer (short writes continue; an error stops it).
    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The directory-level operations. Paths are the ones the callers build under the data
/// directory.
pub trait Storage: Debug + Send + Sync + 'static {
    /// Creates (or truncates) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Cuts the file to `len` bytes and fsyncs it.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsync of the directory: creates, renames and removes in it become durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir` (a missing directory: `NotFound`).
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// The directory and its files become the owner's alone (0700, 0600): the WAL and the
    /// snapshots hold draw epoch secrets; files written before this rule get it here.
    fn restrict_to_owner(&self, dir: &Path) -> io::Result<()>;
}

/// `std::fs`.
#[derive(Debug)]
pub struct RealStorage;

/// The storage every production path uses.
pub static REAL: RealStorage = RealStorage;

/// `&REAL` as the trait object the options carry.
pub fn real() -> &'static dyn Storage {
    &REAL
}

impl StorageFile for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Write::write(self, buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }
}

impl Storage for RealStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        // Owner only: segments and snapshots hold epoch secrets.
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        Ok(Box::new(file))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            // A name that is not UTF-8 is none of ours.
            if let Ok(name) = entry.file_name().into_string() {
                out.push((name, entry.path()));
            }
        }
        Ok(out)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }
    fn restrict_to_owner(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(())
    }
}
