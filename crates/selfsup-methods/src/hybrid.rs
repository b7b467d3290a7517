//! A pretext task as a method of its own ([`PretextMethod`]), or as an auxiliary loss beside
//! another method on the same encoder ([`Hybrid`], `--method simclr+rotation --aux-weight 0.5`).

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind};

use crate::{scalar, Method, Placement, Pretext, Result, StepOutput};

/// Builds a pretext task's head on an encoder of the given feature dimension.
pub type PretextBuilder<'a> = dyn FnOnce(usize, VarBuilder) -> Result<Box<dyn Pretext>> + 'a;

/// An encoder trained by a pretext task alone.
pub struct PretextMethod {
    varmap: VarMap,
    encoder: TaskEncoder,
}

/// The encoder as the outside sees it: inputs go through [`Pretext::encoder_input`] first.
struct TaskEncoder {
    inner: Box<dyn Encoder>,
    task: Box<dyn Pretext>,
}

impl TaskEncoder {
    fn input(&self, x: &Tensor) -> selfsup_models::Result<Tensor> {
        self.task.encoder_input(x).map_err(Into::into)
    }
}

impl Encoder for TaskEncoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> selfsup_models::Result<Tensor> {
        self.inner.forward_t(&self.input(x)?, train)
    }

    fn features(&self, x: &Tensor) -> selfsup_models::Result<Tensor> {
        self.inner.features(&self.input(x)?)
    }

    fn feature_dim(&self) -> usize {
        self.inner.feature_dim()
    }
}

impl PretextMethod {
    /// Encoder from `seed`; the task's head under `<task>_head.`.
    pub fn new(
        kind: &EncoderKind,
        seed: u64,
        at: &Placement,
        head_prefix: &str,
        task: Box<PretextBuilder<'_>>,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let inner = build_encoder(kind, vb.pp("encoder"))?;
        let task = task(inner.feature_dim(), vb.pp(head_prefix))?;
        Ok(Self {
            varmap,
            encoder: TaskEncoder { inner, task },
        })
    }
}

impl Method for PretextMethod {
    fn name(&self) -> &str {
        self.encoder.task.name()
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        self.encoder.task.loss(self.encoder.inner.as_ref(), views)
    }

    /// The encoder behind the task's [`Pretext::encoder_input`] (grey images for colorization).
    fn encoder(&self) -> &dyn Encoder {
        &self.encoder
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

/// `base + weight * task`: a method with a pretext task as an auxiliary loss on its encoder.
/// The task sees the first view only (one extra forward pass of `N` images per step).
pub struct Hybrid {
    name: String,
    base: Box<dyn Method>,
    task: Box<dyn Pretext>,
    weight: f64,
}

impl Hybrid {
    /// Add the task built by `task` (head under `<head_prefix>.`, weights drawn from `seed`) to
    /// `base`'s `VarMap`.
    pub fn new(
        base: Box<dyn Method>,
        weight: f64,
        seed: u64,
        at: &Placement,
        head_prefix: &str,
        task: Box<PretextBuilder<'_>>,
    ) -> Result<Self> {
        let vb = seeded_var_builder(base.varmap(), seed, at.dtype, &at.device);
        let task = task(base.encoder().feature_dim(), vb.pp(head_prefix))?;
        Ok(Self {
            name: format!("{}+{}", base.name(), task.name()),
            base,
            task,
            weight,
        })
    }
}

impl Method for Hybrid {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward_loss(&self, views: &[Tensor], labels: Option<&Tensor>) -> Result<StepOutput> {
        let base = self.base.forward_loss(views, labels)?;
        let aux = self.task.loss(self.base.encoder(), &views[..1])?;
        let loss = (&base.loss + (&aux.loss * self.weight)?)?;
        let mut metrics = vec![
            ("base_loss".to_string(), scalar(&base.loss)?),
            ("aux_loss".to_string(), scalar(&aux.loss)?),
        ];
        metrics.extend(base.metrics);
        metrics.extend(aux.metrics);
        Ok(StepOutput {
            loss,
            metrics,
            embeddings: base.embeddings,
        })
    }

    fn after_step(&mut self, step: u64, total_steps: u64) -> Result<()> {
        self.base.after_step(step, total_steps)
    }

    fn encoder(&self) -> &dyn Encoder {
        self.base.encoder()
    }

    fn varmap(&self) -> &VarMap {
        self.base.varmap()
    }
}
