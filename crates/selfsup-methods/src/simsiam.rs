//! SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"): encoder +
//! projector + predictor, negative cosine between the prediction of one view and the projection
//! of the other, with a stop-gradient on the projection (the target branch).
//!
//! `loss = (-cos(p0, sg(z1)) - cos(p1, sg(z0))) / 2`, see [`simsiam_loss`]. Without the
//! stop-gradient SimSiam collapses; the `embed_std` metric shows it.

use candle_core::Tensor;
use candle_nn::VarMap;
use selfsup_losses::{NegativeCosine, PairLoss};
use selfsup_models::heads::{simsiam_prediction, simsiam_projection};
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use crate::{two_views, Method, Placement, Result, StepOutput};

/// SimSiam hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SimSiamConfig {
    /// Projector width (hidden and output; lightly's CIFAR-10 benchmark: 2048).
    pub hidden_dim: usize,
    /// Projection width (2048).
    pub out_dim: usize,
    /// Predictor bottleneck width (512).
    pub pred_hidden: usize,
}

impl Default for SimSiamConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 2048,
            out_dim: 2048,
            pred_hidden: 512,
        }
    }
}

/// The symmetric SimSiam loss; `z0` and `z1` are detached here (stop-gradient), so gradients
/// reach the encoder only through the predictions `p0`, `p1`.
pub fn simsiam_loss(p0: &Tensor, p1: &Tensor, z0: &Tensor, z1: &Tensor) -> Result<Tensor> {
    let a = NegativeCosine.loss(p0, &z1.detach())?;
    let b = NegativeCosine.loss(p1, &z0.detach())?;
    Ok(((a + b)? * 0.5)?)
}

/// SimSiam.
pub struct SimSiam {
    comm: selfsup_dist::Comm,
    varmap: VarMap,
    encoder: Box<dyn Encoder>,
    projector: Head,
    predictor: Head,
}

impl SimSiam {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &SimSiamConfig, seed: u64, at: &Placement) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let d = encoder.feature_dim();
        let projector = Head::new(
            &simsiam_projection(d, cfg.hidden_dim, cfg.out_dim),
            vb.pp("projection_head"),
        )?;
        let predictor = Head::new(
            &simsiam_prediction(cfg.out_dim, cfg.pred_hidden, cfg.out_dim),
            vb.pp("prediction_head"),
        )?;
        Ok(Self {
            comm: at.comm.clone(),
            varmap,
            encoder,
            projector,
            predictor,
        })
    }
}

impl Method for SimSiam {
    fn name(&self) -> &str {
        "simsiam"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        let (v0, v1) = two_views(views, "SimSiam")?;
        let n = v0.dim(0)?;
        let x = Tensor::cat(&[v0, v1], 0)?;
        let z = self
            .projector
            .forward_t(&self.encoder.forward_t(&x, true)?, true)?;
        let p = self.predictor.forward_t(&z, true)?;
        // Every rank's rows: the loss (a mean over the global batch) is the same on each.
        let g = |t: Tensor| crate::gather(&self.comm, &t);
        let (z0, z1) = (g(z.narrow(0, 0, n)?)?, g(z.narrow(0, n, n)?)?);
        let (p0, p1) = (g(p.narrow(0, 0, n)?)?, g(p.narrow(0, n, n)?)?);
        let loss = simsiam_loss(&p0, &p1, &z0, &z1)?;
        Ok(StepOutput {
            loss,
            metrics: vec![],
            embeddings: z0.detach(),
        })
    }

    fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
