//! The crate's error type.

/// Errors from building, running, saving or loading models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of synchronised BatchNorm failed.
    #[error(transparent)]
    Dist(#[from] selfsup_dist::Error),
    /// A configuration that makes no sense (unknown encoder, bad width, ...).
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A weights file that does not fit the model.
    #[error("{path}: {msg}")]
    Weights {
        /// The file.
        path: std::path::PathBuf,
        /// What does not fit.
        msg: String,
    },
    /// An I/O error with its path.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;
