//! Supervised training with labels: encoder + linear classifier + cross-entropy on the first
//! view. The baseline of the low-label protocol (from scratch) and the fine-tuning method (from
//! a pretrained encoder).

use candle_core::Tensor;
use candle_nn::VarMap;
use selfsup_models::heads::linear_classifier;
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use crate::{Error, Method, Placement, Result, StepOutput};

/// Prefix of the classifier's variables.
pub const CLASSIFIER_PREFIX: &str = "classifier.";

/// Encoder + linear classifier trained with cross-entropy.
pub struct Supervised {
    varmap: VarMap,
    encoder: Box<dyn Encoder>,
    classifier: Head,
}

impl Supervised {
    /// Fresh weights from `seed`, `classes` outputs.
    pub fn new(kind: &EncoderKind, classes: usize, seed: u64, at: &Placement) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let classifier = Head::new(
            &linear_classifier(encoder.feature_dim(), classes),
            vb.pp("classifier"),
        )?;
        Ok(Self {
            varmap,
            encoder,
            classifier,
        })
    }

    /// Class logits `(N, classes)` in eval mode.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .classifier
            .forward_t(&self.encoder.forward_t(x, false)?, false)?)
    }
}

impl Method for Supervised {
    fn name(&self) -> &str {
        "supervised"
    }

    fn forward_loss(&self, views: &[Tensor], labels: Option<&Tensor>) -> Result<StepOutput> {
        let labels =
            labels.ok_or_else(|| Error::Config("supervised training needs labels".into()))?;
        let h = self.encoder.forward_t(&views[0], true)?;
        let logits = self.classifier.forward_t(&h, true)?;
        let loss = selfsup_losses::ops::cross_entropy(&logits, labels)?;
        let acc = logits
            .argmax(candle_core::D::Minus1)?
            .eq(labels)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        Ok(StepOutput {
            loss,
            metrics: vec![("train_acc".into(), acc)],
            embeddings: h.detach(),
        })
    }

    fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
