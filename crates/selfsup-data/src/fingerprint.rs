//! The identity of a dataset on disk, for run records: which bytes a number was measured on.
//!
//! - CIFAR-10 (binary layout): SHA-256 over the six batch files in order (`cifar10:sha256:...`);
//!   the same extracted data gives the same digest wherever it lives.
//! - An image folder: SHA-256 over the sorted list of relative paths and file sizes
//!   (`folder:listing-sha256:...`, N files); cheap for any size of folder, it changes when a
//!   file is added, removed, renamed or resized (not when same-sized content is rewritten).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{cifar, Error, Result};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn hash_file(path: &Path, h: &mut Sha256, buf: &mut [u8]) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    loop {
        let n = file.read(buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// SHA-256 of one file, hex (e.g. the weights an evaluation used).
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_file(path, &mut h, &mut vec![0u8; 1 << 20])?;
    Ok(hex::encode(h.finalize()))
}

/// `cifar10:sha256:<hex>` of the batch files under `data_dir` (as [`cifar::load`] reads them).
pub fn cifar10(data_dir: &Path) -> Result<String> {
    let dir = cifar::batches_dir(data_dir);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in cifar::TRAIN_FILES.iter().chain([cifar::TEST_FILE].iter()) {
        hash_file(&dir.join(f), &mut h, &mut buf)?;
    }
    Ok(format!("cifar10:sha256:{}", hex::encode(h.finalize())))
}

/// `folder:listing-sha256:<hex> (N files)` of every file under `root`.
pub fn folder(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let path = e.path();
            let meta = e.metadata().map_err(io_err(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                files.push((rel.to_string_lossy().into_owned(), meta.len()));
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for (name, len) in &files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
    }
    Ok(format!(
        "folder:listing-sha256:{} ({} files)",
        hex::encode(h.finalize()),
        files.len()
    ))
}
