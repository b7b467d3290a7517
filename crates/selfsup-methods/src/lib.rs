//! # selfsup-methods
//!
//! A self-supervised method is an encoder, its heads and a loss, behind one trait: [`Method`].
//! The trainer only calls `forward_loss` on the views of a batch, steps the optimiser over the
//! parameters the method lists, and calls `after_step` (for EMA-style updates).
//!
//! Design choice: a method owns one `VarMap` holding everything it trains and every buffer, with
//! the encoder's variables under the prefix [`ENCODER_PREFIX`] in torchvision's names, so that the
//! encoder can be saved, loaded and evaluated alone.
#![warn(missing_docs)]

mod simclr;
mod supervised;

pub use simclr::{SimClr, SimClrConfig};
pub use supervised::{Supervised, CLASSIFIER_PREFIX};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use selfsup_models::Encoder;

/// Prefix of the encoder's variables in a method's `VarMap`.
pub const ENCODER_PREFIX: &str = "encoder.";

/// Errors from building or running a method.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the models crate.
    #[error(transparent)]
    Model(#[from] selfsup_models::Error),
    /// From the losses crate.
    #[error(transparent)]
    Loss(#[from] selfsup_losses::Error),
    /// Wrong views or configuration.
    #[error("{0}")]
    Config(String),
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;

/// What one training step produced.
#[derive(Debug)]
pub struct StepOutput {
    /// Scalar loss to minimise.
    pub loss: Tensor,
    /// Named scalar metrics (already detached).
    pub metrics: Vec<(String, f64)>,
    /// `(N, D)` embeddings of the first view (detached), for collapse monitoring.
    pub embeddings: Tensor,
}

/// A self-supervised method.
pub trait Method: Send + Sync {
    /// Short name (`simclr`).
    fn name(&self) -> &str;
    /// Loss on the views of one batch (each `(N, C, H, W)` on the method's device), in train mode.
    /// `labels` is only used by supervised methods.
    fn forward_loss(&self, views: &[Tensor], labels: Option<&Tensor>) -> Result<StepOutput>;
    /// Called after every optimiser step (EMA updates, queues); `step` counts from 0.
    fn after_step(&mut self, _step: u64, _total_steps: u64) -> Result<()> {
        Ok(())
    }
    /// The encoder.
    fn encoder(&self) -> &dyn Encoder;
    /// Every variable (trained parameters and buffers).
    fn varmap(&self) -> &VarMap;
    /// Names of the variables the optimiser updates (buffers and EMA targets excluded), sorted.
    fn trainable(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .varmap()
            .data()
            .lock()
            .unwrap()
            .keys()
            .filter(|k| !selfsup_models::layers::is_buffer(k))
            .cloned()
            .collect();
        v.sort();
        v
    }
    /// Whether `name` gets weight decay (and LARS adaptation): not biases and norm parameters.
    fn weight_decay(&self, name: &str, t: &Tensor) -> bool {
        !selfsup_models::layers::no_weight_decay(name, t)
    }
}

/// The device and dtype a method is built on.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Device.
    pub device: Device,
    /// Parameter dtype.
    pub dtype: DType,
}
