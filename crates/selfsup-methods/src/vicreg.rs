//! VICReg (Bardes, Ponce & LeCun 2022): invariance (MSE between the views' projections),
//! variance (a hinge keeping every dimension's standard deviation above 1) and covariance
//! (off-diagonal covariance to 0) terms, weights 25 / 25 / 1 (`selfsup_losses::Vicreg`).
//! Projector: three linear layers, BN + ReLU between (2048-2048-2048 for CIFAR-10).

use std::sync::Arc;

use candle_core::Tensor;
use selfsup_losses::{Ranks, Vicreg};
use selfsup_models::heads::expander;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{gather_detached, Method, Placement, Result, StepOutput};

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
    /// The data-parallel group for the sharded loss (`None` with one rank).
    ranks: Option<Ranks>,
}

impl VicregMethod {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &VicregConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        let (s, v, c) = cfg.weights;
        let comm = at.comm.clone();
        let ranks = (comm.world_size() > 1).then(|| {
            Ranks::new(
                comm.world_size(),
                Arc::new(move |b: &mut [f32]| {
                    comm.all_reduce_sum_f32(b)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                }),
            )
        });
        Ok(Self {
            inner: EncoderHead::new(kind, |d| expander(d, h, o, 3), seed, at)?,
            loss: Vicreg::new(s, v, c)?,
            ranks,
        })
    }
}

impl Method for VicregMethod {
    fn name(&self) -> &str {
        "vicreg"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        // Two views in f32 on the CPU: the sharded loss, each rank on its own rows (the same
        // value and gradient as the loss of the gathered batch, a fraction of the work).
        if let [v0, v1] = views {
            if v0.device().is_cpu() && v0.dtype() == candle_core::DType::F32 {
                let (z0, z1) = self.inner.project_pair_local(v0, v1)?;
                return Ok(StepOutput {
                    loss: self.loss.sharded_loss(&z0, &z1, self.ranks.as_ref())?,
                    metrics: vec![],
                    embeddings: gather_detached(&self.inner.comm, &z0)?,
                });
            }
        }
        self.inner.pair_loss_step(views, "VICReg", &self.loss)
    }

    encoder_head_accessors!();
}
