//! Explicit pairs: contrastive learning as the seed article states it. A [`PairSampler`] turns a
//! batch into (anchor, positive) and (anchor, negative) pairs, and a margin contrastive loss
//! (Hadsell et al. 2006) or a triplet loss (Schroff et al. 2015) pulls positives together and
//! pushes negatives apart on the unit sphere.
//!
//! Anchors are the first view of every image. Positives are the second view of the same image
//! (augmentation), or, with labels allowed, the second view of another image of the same label.
//! Negatives are the second view of another image: the next one in the (shuffled) batch, or,
//! with labels, the next one with a different label. Without labels a negative can be a false
//! negative of the same class, as in every label-free contrastive method.

use candle_core::{Device, Tensor};
use selfsup_losses::ops::normalize;
use selfsup_losses::{ContrastiveMargin, TripletMargin};
use selfsup_models::heads::simclr_projection;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{scalar, two_views, Error, Method, Placement, Result, StepOutput};

/// Which pair loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairLossKind {
    /// Margin contrastive loss over (anchor, positive) and (anchor, negative) pairs.
    Margin,
    /// Triplet loss over (anchor, positive, negative).
    Triplet,
}

impl std::str::FromStr for PairLossKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "margin" => Ok(Self::Margin),
            "triplet" => Ok(Self::Triplet),
            _ => Err(Error::Config(format!(
                "unknown pair loss {s:?} (known: margin, triplet)"
            ))),
        }
    }
}

/// Pair-method hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PairsConfig {
    /// Head hidden width (512).
    pub hidden_dim: usize,
    /// Embedding width (128).
    pub out_dim: usize,
    /// The loss.
    pub loss: PairLossKind,
    /// Margin (on unit vectors, distances lie in [0, 2]; default 1.0).
    pub margin: f64,
    /// Positives and negatives from labels (supervised) instead of augmentation only.
    pub use_labels: bool,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 512,
            out_dim: 128,
            loss: PairLossKind::Margin,
            margin: 1.0,
            use_labels: false,
        }
    }
}

/// For each anchor `i`, the batch index whose second view is its positive and the one whose
/// second view is its negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pairs {
    /// Positive of anchor `i`.
    pub positive: Vec<u32>,
    /// Negative of anchor `i`.
    pub negative: Vec<u32>,
}

/// Makes the pairs of a batch (deterministic given the batch; the loader's shuffling makes the
/// partners random).
#[derive(Clone, Copy, Debug, Default)]
pub struct PairSampler {
    /// Use labels for positives (same label) and negatives (different label).
    pub use_labels: bool,
}

impl PairSampler {
    /// Pairs for a batch of `n` images with optional `labels`.
    pub fn sample(&self, n: usize, labels: Option<&[u32]>) -> Result<Pairs> {
        if n < 2 {
            return Err(Error::Config(format!(
                "pairs needs at least 2 images per batch, got {n}"
            )));
        }
        let labels = match (self.use_labels, labels) {
            (false, _) => None,
            (true, Some(l)) if l.len() == n => Some(l),
            (true, Some(l)) => {
                return Err(Error::Config(format!(
                    "{} labels for a batch of {n}",
                    l.len()
                )))
            }
            (true, None) => {
                return Err(Error::Config(
                    "pairs with labels (pair_labels = true) needs a labelled dataset".into(),
                ))
            }
        };
        let mut positive = Vec::with_capacity(n);
        let mut negative = Vec::with_capacity(n);
        for i in 0..n {
            let next =
                |pred: &dyn Fn(usize) -> bool| (1..n).map(|o| (i + o) % n).find(|&j| pred(j));
            match labels {
                None => {
                    positive.push(i as u32);
                    negative.push(((i + 1) % n) as u32);
                }
                Some(l) => {
                    let p = next(&|j| l[j] == l[i]).unwrap_or(i);
                    let q = next(&|j| l[j] != l[i]).unwrap_or((i + 1) % n);
                    positive.push(p as u32);
                    negative.push(q as u32);
                }
            }
        }
        Ok(Pairs { positive, negative })
    }
}

/// The explicit-pairs method.
pub struct PairsMethod {
    inner: EncoderHead,
    cfg: PairsConfig,
    sampler: PairSampler,
}

impl PairsMethod {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &PairsConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        // Validate the margin now rather than at the first step.
        ContrastiveMargin::new(cfg.margin)?;
        Ok(Self {
            inner: EncoderHead::new(kind, |d| simclr_projection(d, h, o), seed, at)?,
            cfg: cfg.clone(),
            sampler: PairSampler {
                use_labels: cfg.use_labels,
            },
        })
    }
}

fn index(v: &[u32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), v.len(), dev)?)
}

impl Method for PairsMethod {
    fn name(&self) -> &str {
        "pairs"
    }

    fn forward_loss(&self, views: &[Tensor], labels: Option<&Tensor>) -> Result<StepOutput> {
        let (v0, v1) = two_views(views, "pairs")?;
        let n = v0.dim(0)? * self.inner.comm.world_size();
        let lv = match labels {
            Some(l) if self.cfg.use_labels => {
                Some(crate::gather_detached(&self.inner.comm, l)?.to_vec1::<u32>()?)
            }
            _ => None,
        };
        let pairs = self.sampler.sample(n, lv.as_deref())?;
        let (z0, z1) = self.inner.project_pair(v0, v1)?;
        let (a, z1) = (normalize(&z0)?, normalize(&z1)?);
        let dev = a.device();
        let pos = z1.index_select(&index(&pairs.positive, dev)?, 0)?;
        let neg = z1.index_select(&index(&pairs.negative, dev)?, 0)?;
        let loss = match self.cfg.loss {
            PairLossKind::Margin => {
                let same = Tensor::cat(
                    &[
                        Tensor::ones(n, a.dtype(), dev)?,
                        Tensor::zeros(n, a.dtype(), dev)?,
                    ],
                    0,
                )?;
                ContrastiveMargin::new(self.cfg.margin)?.loss(
                    &Tensor::cat(&[&a, &a], 0)?,
                    &Tensor::cat(&[&pos, &neg], 0)?,
                    &same,
                )?
            }
            PairLossKind::Triplet => TripletMargin::new(self.cfg.margin)?.loss(&a, &pos, &neg)?,
        };
        let dist =
            |b: &Tensor| -> Result<f64> { scalar(&(&a - b)?.sqr()?.sum(1)?.sqrt()?.mean_all()?) };
        Ok(StepOutput {
            loss,
            metrics: vec![
                ("pos_dist".into(), dist(&pos.detach())?),
                ("neg_dist".into(), dist(&neg.detach())?),
            ],
            embeddings: z0.detach(),
        })
    }

    encoder_head_accessors!();
}
