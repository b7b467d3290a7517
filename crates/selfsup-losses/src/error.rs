//! The crate's error type.

/// Errors from loss functions: bad arguments and shapes, or candle errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A hyper-parameter out of range (temperature <= 0 or NaN, ...).
    #[error("invalid loss parameter: {0}")]
    Param(String),
    /// Inputs of the wrong shape or dtype, or a batch too small for the loss.
    #[error("invalid loss input: {0}")]
    Input(String),
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;
