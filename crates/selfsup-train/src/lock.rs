//! One run per folder: an exclusive OS file lock on `RUN/.lock`, released when the process
//! ends however it ends (the kernel drops `flock` locks of a dead process).

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Holds the run folder for this process until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Lock `run` (created if missing), or fail at once with [`Error::Busy`] naming the holder.
    pub fn acquire(run: &Path) -> Result<Self> {
        std::fs::create_dir_all(run).map_err(|source| Error::Io {
            path: run.to_path_buf(),
            source,
        })?;
        let path = run.join(".lock");
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                return Err(Error::Busy {
                    path: run.to_path_buf(),
                    pid: s.trim().parse().ok(),
                });
            }
            Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's pid, for the message another process prints.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
