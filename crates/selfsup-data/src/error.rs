//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, augmenting or downloading data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// File or folder involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A data file has the wrong size or content.
    #[error("{path}: {msg}")]
    BadFile {
        /// File involved.
        path: PathBuf,
        /// What is wrong, with the offset where it applies.
        msg: String,
    },
    /// An image could not be decoded.
    #[error("{path}: cannot decode image: {msg}")]
    Decode {
        /// File involved.
        path: PathBuf,
        /// Decoder message.
        msg: String,
    },
    /// A dataset, transform or loader was configured with values that make no sense.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Index past the end of a dataset.
    #[error("index {index} out of range for a dataset of {len} items")]
    OutOfRange {
        /// Requested index.
        index: usize,
        /// Dataset length.
        len: usize,
    },
    /// An error from candle while building a batch tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A download failed (HTTP error, wrong digest, interrupted transfer, corrupt archive).
    #[error("{0}")]
    Download(String),
}

/// Shorthand for `std::result::Result<T, selfsup_data::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Attach a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
