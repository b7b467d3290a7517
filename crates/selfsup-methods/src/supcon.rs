//! Supervised contrastive learning (Khosla et al. 2020): SimCLR's encoder and projection head,
//! with every image of the same label (both views) as a positive (`selfsup_losses::SupCon`).
//! **Uses labels**: it is not self-supervised, and is here as the upper reference of the
//! contrastive family.

use candle_core::Tensor;
use selfsup_losses::SupCon;
use selfsup_models::heads::simclr_projection;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{two_views, Error, Method, Placement, Result, StepOutput};

/// SupCon hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SupConConfig {
    /// Head hidden width (512).
    pub hidden_dim: usize,
    /// Projection width (128).
    pub out_dim: usize,
    /// Temperature (0.1, the paper's).
    pub temperature: f64,
}

impl Default for SupConConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 512,
            out_dim: 128,
            temperature: 0.1,
        }
    }
}

/// SupCon.
pub struct SupConMethod {
    inner: EncoderHead,
    loss: SupCon,
}

impl SupConMethod {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &SupConConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        Ok(Self {
            inner: EncoderHead::new(kind, |d| simclr_projection(d, h, o), seed, at)?,
            loss: SupCon::new(cfg.temperature)?,
        })
    }
}

impl Method for SupConMethod {
    fn name(&self) -> &str {
        "supcon"
    }

    fn forward_loss(&self, views: &[Tensor], labels: Option<&Tensor>) -> Result<StepOutput> {
        let labels = labels.ok_or_else(|| {
            Error::Config("supcon uses labels: train it on a labelled dataset".into())
        })?;
        let (v0, v1) = two_views(views, "SupCon")?;
        let (z0, z1) = self.inner.project_pair(v0, v1)?;
        let f = Tensor::stack(&[&z0, &z1], 1)?;
        Ok(StepOutput {
            loss: self
                .loss
                .loss(&f, &crate::gather_detached(&self.inner.comm, labels)?)?,
            metrics: vec![],
            embeddings: z0.detach(),
        })
    }

    encoder_head_accessors!();
}
