//! # selfsup-train
//!
//! The training loop for any [`selfsup_methods::Method`]: optimisers that own their state
//! ([`optim`]: SGD with momentum/Nesterov, AdamW, LARS; warmup + cosine schedule; gradient
//! clipping), checkpoints written atomically after every epoch ([`checkpoint`]), exact resume,
//! metrics as JSON lines, a kNN monitor, runs fitted to a wall-clock budget ([`budget`]), and a
//! clear stop on a non-finite loss.
//!
//! Design choice: the optimiser state, the schedule position and the data order are all
//! functions of what a checkpoint stores (weights, optimiser tensors, epoch and step) and of the
//! seed, so a run killed after epoch `k` and resumed ends bit-identical to one never stopped.
#![warn(missing_docs)]

pub mod budget;
pub mod checkpoint;
mod config;
mod lock;
pub mod optim;
pub mod record;
pub mod setup;
mod trainer;
pub mod whiten;

pub use config::TrainConfig;
pub use lock::RunLock;
/// The workspace's one atomic, durable file writer (see [`selfsup_models::io::write_atomic`]).
pub use selfsup_models::io::write_atomic;
pub use trainer::{
    all_reduce_gradients, embedding_std, method_params, parse_device, shard_range, KnnMonitor,
    Progress, Summary, Trainer, COLLAPSE_FRACTION,
};

/// Errors from training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From a method.
    #[error(transparent)]
    Method(#[from] selfsup_methods::Error),
    /// From evaluation.
    #[error(transparent)]
    Eval(#[from] selfsup_eval::Error),
    /// From the models crate (weights, atomic writes).
    #[error(transparent)]
    Model(#[from] selfsup_models::Error),
    /// From the data pipeline.
    #[error(transparent)]
    Data(#[from] selfsup_data::Error),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not fit.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The loss became NaN or infinite.
    #[error("loss is {value} at step {step} (epoch {}): stopping; {}", epoch + 1, if *epoch == 0 { "no checkpoint was written (the run stopped in its first epoch)".to_string() } else { format!("the last checkpoint (after {epoch} completed epochs) is intact") })]
    NonFinite {
        /// Step (0-based) whose loss was not finite.
        step: u64,
        /// Epoch (0-based) of that step.
        epoch: usize,
        /// The loss value.
        value: f64,
    },
    /// Stopped by a signal (SIGINT, SIGTERM) between two steps.
    #[error("interrupted at step {step} (epoch {}): {}", epoch + 1, if *epoch == 0 { "no checkpoint was written yet; the run starts over without --resume".to_string() } else { format!("resume with --resume from the checkpoint after {epoch} completed epochs") })]
    Interrupted {
        /// Steps taken.
        step: u64,
        /// Epoch (0-based) that was running.
        epoch: usize,
    },
    /// Another process trains into the same run folder.
    #[error("{path} is in use by another selfsup process{}: one run per folder", match pid { Some(p) => format!(" (pid {p})"), None => String::new() })]
    Busy {
        /// The run folder.
        path: std::path::PathBuf,
        /// The holder's process id, as it wrote it.
        pid: Option<u32>,
    },
    /// A collective of data-parallel training failed.
    #[error(transparent)]
    Dist(#[from] selfsup_dist::Error),
    /// I/O with a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;
