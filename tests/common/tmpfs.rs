//! A small tmpfs mounted for one test, so the disk really fills. Needs root (CI runs as root);
//! without it the test fails saying so. Unmounted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    pub dir: PathBuf,
    /// Remove the directory after unmounting (true when this guard created it).
    owns_dir: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "256k") on a new temporary directory.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        Self::mount_on(&dir, size, true)
    }

    /// Mounts a tmpfs of `size` on `dir` (created if missing).
    pub fn mount_at(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create mount point");
        Self::mount_on(dir, size, false)
    }

    fn mount_on(dir: &Path, size: &str, owns_dir: bool) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: the disk-full tests need root (as CI has)"
        );
        Tmpfs {
            dir: dir.to_path_buf(),
            owns_dir,
        }
    }

    pub fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the available bytes")
    }

    /// Fills the file system with `filler`, leaving about `bytes_free`.
    pub fn fill_leaving(&self, bytes_free: u64) -> PathBuf {
        let filler = self.dir.join("filler");
        let size = self.free_bytes().saturating_sub(bytes_free);
        let _ = std::fs::write(&filler, vec![0u8; size as usize]);
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
