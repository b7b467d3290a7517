//! BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): an online encoder + projector +
//! predictor regresses the projection of the other view by a momentum (EMA) target network.
//!
//! `z = projector(encoder(x))`, `p = predictor(z)` online; `z' = target_projector(target_encoder(x))`
//! with no gradient. Loss, symmetric over the two views and averaged:
//! `(2 - 2 cos(p0, z'1) + 2 - 2 cos(p1, z'0)) / 2`. The target follows the online network by
//! EMA with `tau` going from 0.99 to 1 on a cosine schedule (the paper's, with 0.99 for short
//! runs as lightly's CIFAR-10 benchmark).

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use selfsup_losses::ops::cosine_similarity;
use selfsup_models::heads::byol_head;
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use crate::ema::{ema_update, momentum_at, target_pairs, Momentum};
use crate::{two_views, Method, Placement, Result, StepOutput};

/// BYOL hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ByolConfig {
    /// Projector hidden width (lightly's CIFAR-10 benchmark: 1024; paper: 4096).
    pub hidden_dim: usize,
    /// Projection width (256).
    pub out_dim: usize,
    /// Predictor hidden width (1024; paper: 4096).
    pub pred_hidden: usize,
    /// Target momentum (0.99 -> 1, cosine).
    pub momentum: Momentum,
}

impl Default for ByolConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 1024,
            out_dim: 256,
            pred_hidden: 1024,
            momentum: Momentum {
                base: 0.99,
                cosine: true,
            },
        }
    }
}

/// BYOL.
pub struct Byol {
    comm: selfsup_dist::Comm,
    varmap: VarMap,
    encoder: Box<dyn Encoder>,
    projector: Head,
    predictor: Head,
    target_encoder: Box<dyn Encoder>,
    target_projector: Head,
    pairs: Vec<(Var, Var)>,
    momentum: Momentum,
}

impl Byol {
    /// Build with fresh weights drawn from `seed`; the target starts as a copy.
    pub fn new(kind: &EncoderKind, cfg: &ByolConfig, seed: u64, at: &Placement) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let d = encoder.feature_dim();
        let proj = byol_head(d, cfg.hidden_dim, cfg.out_dim);
        let projector = Head::new(&proj, vb.pp("projection_head"))?;
        let predictor = Head::new(
            &byol_head(cfg.out_dim, cfg.pred_hidden, cfg.out_dim),
            vb.pp("prediction_head"),
        )?;
        let target_encoder = build_encoder(kind, vb.pp("target_encoder"))?;
        let target_projector = Head::new(&proj, vb.pp("target_projection_head"))?;
        let pairs = target_pairs(&varmap, &["encoder.", "projection_head."])?;
        Ok(Self {
            comm: at.comm.clone(),
            varmap,
            encoder,
            projector,
            predictor,
            target_encoder,
            target_projector,
            pairs,
            momentum: cfg.momentum,
        })
    }

    /// The `(online, target)` parameter pairs the EMA updates.
    pub fn target_pairs(&self) -> &[(Var, Var)] {
        &self.pairs
    }
}

impl Method for Byol {
    fn name(&self) -> &str {
        "byol"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        let (v0, v1) = two_views(views, "BYOL")?;
        let n = v0.dim(0)?;
        let x = Tensor::cat(&[v0, v1], 0)?;
        let z = self
            .projector
            .forward_t(&self.encoder.forward_t(&x, true)?, true)?;
        let p = self.predictor.forward_t(&z, true)?;
        let zt = self
            .target_projector
            .forward_t(&self.target_encoder.forward_t(&x, true)?, true)?
            .detach();
        // Every rank's rows: the loss (a mean over the global batch) is the same on each.
        let g = |t: Tensor| crate::gather(&self.comm, &t);
        let gd = |t: Tensor| crate::gather_detached(&self.comm, &t);
        let (p0, p1) = (g(p.narrow(0, 0, n)?)?, g(p.narrow(0, n, n)?)?);
        let (t0, t1) = (gd(zt.narrow(0, 0, n)?)?, gd(zt.narrow(0, n, n)?)?);
        // (2 - 2cos(p0, t1) + 2 - 2cos(p1, t0)) / 2 = 2 - mean cos(p0, t1) - mean cos(p1, t0)
        let cos = (cosine_similarity(&p0, &t1)?.mean_all()?
            + cosine_similarity(&p1, &t0)?.mean_all()?)?;
        let loss = cos.affine(-1.0, 2.0)?;
        Ok(StepOutput {
            loss,
            metrics: vec![],
            embeddings: z.narrow(0, 0, n)?.detach(),
        })
    }

    fn after_step(&mut self, step: u64, total_steps: u64) -> Result<()> {
        ema_update(&self.pairs, momentum_at(self.momentum, step, total_steps))
    }

    fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
