//! SimCLR (Chen et al. 2020): encoder, projection head `Linear-BN-ReLU-Linear`, NT-Xent on
//! the projections of two views.

use candle_core::Tensor;
use candle_nn::VarMap;
use selfsup_losses::{NtXent, PairLoss};
use selfsup_models::heads::simclr_projection;
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use crate::{Error, Method, Placement, Result, StepOutput};

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
    varmap: VarMap,
    encoder: Box<dyn Encoder>,
    head: Head,
    loss: NtXent,
}

impl SimClr {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &SimClrConfig, seed: u64, at: &Placement) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let d = encoder.feature_dim();
        let head = Head::new(
            &simclr_projection(d, cfg.hidden_dim, cfg.out_dim),
            vb.pp("projection_head"),
        )?;
        Ok(Self {
            varmap,
            encoder,
            head,
            loss: NtXent::new(cfg.temperature)?,
        })
    }
}

impl Method for SimClr {
    fn name(&self) -> &str {
        "simclr"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        if views.len() != 2 {
            return Err(Error::Config(format!(
                "SimCLR needs 2 views per image, got {}",
                views.len()
            )));
        }
        // Both views through the encoder in one batch (BatchNorm sees 2N samples, as lightly's
        // benchmark does when it concatenates the views).
        let n = views[0].dim(0)?;
        let x = Tensor::cat(&[&views[0], &views[1]], 0)?;
        let h = self.encoder.forward_t(&x, true)?;
        let z = self.head.forward_t(&h, true)?;
        let (z0, z1) = (z.narrow(0, 0, n)?, z.narrow(0, n, n)?);
        let loss = self.loss.loss(&z0, &z1)?;
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
