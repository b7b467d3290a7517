//! VICReg (Bardes, Ponce & LeCun 2022): invariance (MSE between the views' projections),
//! variance (a hinge keeping every dimension's standard deviation above 1) and covariance
//! (off-diagonal covariance to 0) terms, weights 25 / 25 / 1 (`selfsup_losses::Vicreg`).
//! Projector: three linear layers, BN + ReLU between (2048-2048-2048 for CIFAR-10).

use candle_core::Tensor;
use selfsup_losses::Vicreg;
use selfsup_models::heads::expander;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{Method, Placement, Result, StepOutput};

/// VICReg hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VicregConfig {
    /// Projector hidden width (2048).
    pub hidden_dim: usize,
    /// Projector output width (2048).
    pub out_dim: usize,
    /// Invariance, variance and covariance weights (25, 25, 1).
    pub weights: (f64, f64, f64),
}

impl Default for VicregConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 2048,
            out_dim: 2048,
            weights: (25.0, 25.0, 1.0),
        }
    }
}

/// VICReg.
pub struct VicregMethod {
    inner: EncoderHead,
    loss: Vicreg,
}

impl VicregMethod {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &VicregConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        let (s, v, c) = cfg.weights;
        Ok(Self {
            inner: EncoderHead::new(kind, |d| expander(d, h, o, 3), seed, at)?,
            loss: Vicreg::new(s, v, c)?,
        })
    }
}

impl Method for VicregMethod {
    fn name(&self) -> &str {
        "vicreg"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        self.inner.pair_loss_step(views, "VICReg", &self.loss)
    }

    encoder_head_accessors!();
}
