//! # selfsup-methods
//!
//! A self-supervised method is an encoder, its heads and a loss, behind one trait: [`Method`].
//! The trainer only calls `forward_loss` on the views of a batch, steps the optimiser over the
//! parameters the method lists, and calls `after_step` (for EMA-style updates).
//!
//! Design choice: a method owns one `VarMap` holding everything it trains and every buffer, with
//! the encoder's variables under the prefix [`ENCODER_PREFIX`] in torchvision's names, so that the
//! encoder can be saved, loaded and evaluated alone. Variables the optimiser must not touch
//! are named so: BatchNorm buffers, momentum targets under [`TARGET_PREFIX`] (updated by EMA in
//! `after_step`) and other state such as MoCo's queue under [`STATE_PREFIX`]. Because everything
//! lives in the one `VarMap`, a checkpoint of it resumes any method exactly.
//!
//! | method | file | loss | extra |
//! | --- | --- | --- | --- |
//! | `simclr` | `simclr.rs` | NT-Xent | |
//! | `moco` | `moco.rs` | InfoNCE with a queue | momentum encoder, FIFO queue |
//! | `byol` | `byol.rs` | `2 - 2 cos` | momentum target, predictor |
//! | `simsiam` | `simsiam.rs` | negative cosine | stop-gradient, predictor |
//! | `barlow` | `barlow.rs` | Barlow Twins | |
//! | `vicreg` | `vicreg.rs` | VICReg | |
//! | `supcon` | `supcon.rs` | SupCon | uses labels |
//! | `pairs` | `pairs.rs` | margin contrastive or triplet | [`PairSampler`] |
//! | `rotation` | `rotation.rs` | cross-entropy over 4 rotations | a [`Pretext`] task |
//! | `colorization` | `colorization.rs` | ab regression or binned cross-entropy | a [`Pretext`] task |
//! | `A+B` | `hybrid.rs` | `A + w B` | any method plus a pretext task |
//! | `supervised` | `supervised.rs` | cross-entropy | uses labels |
#![warn(missing_docs)]

mod barlow;
mod byol;
mod colorization;
mod common;
mod ema;
mod hybrid;
mod moco;
mod pairs;
mod rotation;
mod simclr;
mod simsiam;
mod supcon;
mod supervised;
mod vicreg;

pub use barlow::{Barlow, BarlowConfig};
pub use byol::{Byol, ByolConfig};
pub use colorization::{
    grey_input, rgb_to_lab, ColorTarget, Colorization, ColorizationConfig, GreyInput,
};
pub use ema::{ema_update, momentum_at, Momentum};
pub use hybrid::{Hybrid, PretextBuilder, PretextMethod};
pub use moco::{Moco, MocoConfig};
pub use pairs::{PairLossKind, PairSampler, Pairs, PairsConfig, PairsMethod};
pub use rotation::{rotate_batch, rotation_batch, Rotation};
pub use simclr::{SimClr, SimClrConfig};
pub use simsiam::{simsiam_loss, SimSiam, SimSiamConfig};
pub use supcon::{SupConConfig, SupConMethod};
pub use supervised::{Supervised, CLASSIFIER_PREFIX};
pub use vicreg::{VicregConfig, VicregMethod};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use selfsup_dist::Comm;
use selfsup_models::Encoder;

/// Prefix of the encoder's variables in a method's `VarMap`.
pub const ENCODER_PREFIX: &str = "encoder.";

/// Prefix of momentum (EMA) copies: `target_encoder.`, `target_projection_head.`. Not trained
/// by the optimiser.
pub const TARGET_PREFIX: &str = "target_";

/// Prefix of non-parameter state kept in the `VarMap` so that checkpoints hold it (MoCo's queue
/// and its write position). Not trained by the optimiser.
pub const STATE_PREFIX: &str = "state.";

/// Whether the optimiser updates the variable `name`: not a BatchNorm buffer, not a momentum
/// target, not state.
pub fn is_trainable(name: &str) -> bool {
    !selfsup_models::layers::is_buffer(name)
        && !name.starts_with(TARGET_PREFIX)
        && !name.starts_with(STATE_PREFIX)
}

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
    /// A collective (data-parallel training) failed.
    #[error(transparent)]
    Dist(#[from] selfsup_dist::Error),
    /// Wrong views or configuration.
    #[error("{0}")]
    Config(String),
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;

/// For code that runs a method's step inside an [`Encoder`] (an input mapping in front of an
/// encoder): candle and model errors pass through, the rest become `Config`.
impl From<Error> for selfsup_models::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => Self::Candle(e),
            Error::Model(e) => e,
            Error::Dist(e) => Self::Dist(e),
            e => Self::Config(e.to_string()),
        }
    }
}

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
            .filter(|k| is_trainable(k))
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

/// A pretext task (rotation, colorization): a loss on the views computed through an encoder it
/// does not own, so that it can train an encoder alone ([`PretextMethod`]) or as an auxiliary
/// loss beside another method ([`Hybrid`]). Its head lives in the method's `VarMap`.
pub trait Pretext: Send + Sync {
    /// Short name (`rotation`).
    fn name(&self) -> &str;
    /// The task's loss on `views` (each `(N, C, H, W)`, normalised), in train mode.
    fn loss(&self, encoder: &dyn Encoder, views: &[Tensor]) -> Result<StepOutput>;
    /// What an encoder trained by this task alone sees of normalised images at inference: the
    /// images themselves (the default), or the grey input colorization trains on.
    /// [`PretextMethod::encoder`] applies it, so the kNN monitor and every feature consumer get
    /// the input the encoder was trained on.
    fn encoder_input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// The two views of a batch, or an error naming the method.
pub(crate) fn two_views<'a>(views: &'a [Tensor], what: &str) -> Result<(&'a Tensor, &'a Tensor)> {
    match views {
        [a, b] => Ok((a, b)),
        _ => Err(Error::Config(format!(
            "{what} needs 2 views per image, got {} (use a two-view augmentation such as simclr_cifar)",
            views.len()
        ))),
    }
}

/// Scalar as f64 (for metrics).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The device and dtype a method is built on, and the ranks it trains with.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Device.
    pub device: Device,
    /// Parameter dtype.
    pub dtype: DType,
    /// The data-parallel group: losses see the embeddings of every rank's batch (gathered with
    /// a gradient), MoCo enqueues every rank's keys. [`selfsup_dist::single`] for one process.
    pub comm: Comm,
}

impl Placement {
    /// One process on `device` with `dtype` parameters.
    pub fn new(device: Device, dtype: DType) -> Self {
        Self {
            device,
            dtype,
            comm: selfsup_dist::single(),
        }
    }
}

/// `x` (`(n, ...)`) of every rank, rank 0's rows first, with a gradient to this rank's rows.
pub(crate) fn gather(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    Ok(selfsup_dist::all_gather(comm, x)?)
}

/// Every rank's `x`, without gradient (keys, labels).
pub(crate) fn gather_detached(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    Ok(selfsup_dist::all_gather_detached(comm, x)?)
}
