//! SimCLR (Chen et al. 2020): encoder, projection head `Linear-BN-ReLU-Linear`, NT-Xent on
//! the projections of two views.

use candle_core::Tensor;
use selfsup_losses::NtXent;
use selfsup_models::heads::simclr_projection;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{Method, Placement, Result, StepOutput};

/// SimCLR hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SimClrConfig {
    /// Projection head hidden width (lightly's CIFAR-10 benchmark: 512 for ResNet-18).
    pub hidden_dim: usize,
    /// Projection output width (128).
    pub out_dim: usize,
    /// NT-Xent temperature (0.5, as in SimCLR's CIFAR-10 experiments and lightly's default).
    pub temperature: f64,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 512,
            out_dim: 128,
            temperature: 0.5,
        }
    }
}

/// SimCLR.
pub struct SimClr {
    inner: EncoderHead,
    loss: NtXent,
}

impl SimClr {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &SimClrConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        Ok(Self {
            inner: EncoderHead::new(kind, |d| simclr_projection(d, h, o), seed, at)?,
            loss: NtXent::new(cfg.temperature)?,
        })
    }
}

impl Method for SimClr {
    fn name(&self) -> &str {
        "simclr"
    }

    /// Both views go through the encoder in one batch (BatchNorm sees 2N samples, as lightly's
    /// benchmark does when it concatenates the views).
    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        self.inner.pair_loss_step(views, "SimCLR", &self.loss)
    }

    encoder_head_accessors!();
}
