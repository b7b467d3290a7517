//! CIFAR-10 in the official binary layout (`cifar-10-batches-bin/`).
//!
//! Each record is 3,073 bytes: a label byte (0-9) then 1,024 red, 1,024 green and 1,024 blue
//! bytes, each plane row-major. The reader keeps the images as `u8` CHW in one buffer
//! (150 MB for the training set as `u8`, four times less than candle-datasets' `f32`).

use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{Error, InMemory, Result};

/// Bytes per record: label + 3 x 32 x 32.
pub const RECORD_LEN: usize = 1 + 3 * 32 * 32;
/// Records per batch file.
pub const RECORDS_PER_FILE: usize = 10_000;
/// Folder name inside the data directory.
pub const BATCHES_DIR: &str = "cifar-10-batches-bin";
/// The five training files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";
/// Class names file.
pub const META_FILE: &str = "batches.meta.txt";
/// Class names in label order (used when the meta file is absent).
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Which part of CIFAR-10 to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// 50,000 training images.
    Train,
    /// 10,000 test images.
    Test,
}

/// Find the batches folder: `dir` itself if it holds the batch files, else `dir/cifar-10-batches-bin`.
pub fn batches_dir(dir: &Path) -> PathBuf {
    if dir.join(TEST_FILE).is_file() {
        dir.to_path_buf()
    } else {
        dir.join(BATCHES_DIR)
    }
}

/// Whether `dir` (a data dir or the batches folder) holds a complete CIFAR-10 with the right sizes.
pub fn is_complete(dir: &Path) -> bool {
    let b = batches_dir(dir);
    TRAIN_FILES.iter().chain([TEST_FILE].iter()).all(|f| {
        std::fs::metadata(b.join(f))
            .map(|m| m.len() == (RECORD_LEN * RECORDS_PER_FILE) as u64)
            .unwrap_or(false)
    }) && b.join(META_FILE).is_file()
}

/// Read one split of CIFAR-10 from `dir` (the data dir or the batches folder itself).
///
/// Errors name the file and, for bad labels, the byte offset.
pub fn load(dir: &Path, split: Split) -> Result<InMemory> {
    let b = batches_dir(dir);
    let files: Vec<&str> = match split {
        Split::Train => TRAIN_FILES.to_vec(),
        Split::Test => vec![TEST_FILE],
    };
    let n = files.len() * RECORDS_PER_FILE;
    let mut pixels = Vec::with_capacity(n * (RECORD_LEN - 1));
    let mut labels = Vec::with_capacity(n);
    for f in files {
        let path = b.join(f);
        read_batch(&path, &mut pixels, &mut labels)?;
    }
    Ok(InMemory {
        pixels,
        labels: Some(labels),
        class_names: class_names(&b)?,
        channels: 3,
        height: 32,
        width: 32,
    })
}

/// Append the records of one batch file to `pixels` and `labels`.
pub fn read_batch(path: &Path, pixels: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::BadFile {
                path: path.to_path_buf(),
                msg: "CIFAR-10 file not found (fetch it with `cargo xtask cifar10` or `selfsup train`, which downloads on first use)".into(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    if bytes.is_empty() || bytes.len() % RECORD_LEN != 0 {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            msg: format!(
                "size {} is not a multiple of the {RECORD_LEN}-byte record (truncated or not CIFAR-10 binary); expected {}",
                bytes.len(),
                RECORD_LEN * RECORDS_PER_FILE
            ),
        });
    }
    for (r, rec) in bytes.chunks_exact(RECORD_LEN).enumerate() {
        let label = rec[0];
        if label > 9 {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                msg: format!(
                    "label {label} outside 0-9 in record {r} at byte offset {}",
                    r * RECORD_LEN
                ),
            });
        }
        labels.push(label);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

fn class_names(b: &Path) -> Result<Vec<String>> {
    let meta = b.join(META_FILE);
    match std::fs::read_to_string(&meta) {
        Ok(s) => {
            let names: Vec<String> = s
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() != 10 {
                return Err(Error::BadFile {
                    path: meta,
                    msg: format!("expected 10 class names, found {}", names.len()),
                });
            }
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(CLASSES.iter().map(|s| s.to_string()).collect())
        }
        Err(e) => Err(e).at(meta),
    }
}

/// Write records in the official layout (used by tests and tools that make small fixtures).
pub fn write_batch(path: &Path, images: &[u8], labels: &[u8]) -> Result<()> {
    assert_eq!(images.len(), labels.len() * (RECORD_LEN - 1));
    let mut out = Vec::with_capacity(labels.len() * RECORD_LEN);
    for (i, &l) in labels.iter().enumerate() {
        out.push(l);
        out.extend_from_slice(&images[i * (RECORD_LEN - 1)..(i + 1) * (RECORD_LEN - 1)]);
    }
    std::fs::write(path, out).at(path)
}
