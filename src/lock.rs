//! The data directory lock: one worker per data directory.
//!
//! `data_dir/LOCK` is held with an exclusive, non-blocking `flock` for the life of the
//! process. The kernel releases it when the process dies, even on SIGKILL, so a crash never
//! leaves a stale lock. The file holds the owner's pid, for the error message only.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Held for the life of the process; dropping it releases the lock.
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data directory {dir} is in use by another rewardpool process{owner} (lock file {lock}); stop it first or use another storage.data_dir"
    )]
    Busy {
        dir: String,
        lock: String,
        owner: String,
    },
    #[error("cannot open lock file {path}: {error}")]
    Io { path: String, error: io::Error },
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join("LOCK");
        let io_err = |error| LockError::Io {
            path: path.display().to_string(),
            error,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                let owner = owner.trim();
                return Err(LockError::Busy {
                    dir: dir.display().to_string(),
                    lock: path.display().to_string(),
                    owner: if owner.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {owner})")
                    },
                });
            }
            return Err(io_err(err));
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        write!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(DirLock { _file: file })
    }
}
