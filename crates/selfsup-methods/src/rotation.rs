//! Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning
//! by Predicting Image Rotations"): each image is rotated by 0, 90, 180 or 270 degrees and a
//! 4-way head on the encoder's features predicts which.
//!
//! In a batch of `N` images (per view), the first quarter is kept upright, the second rotated
//! by 90 degrees, and so on ([`rotation_batch`]); the loader shuffles images every epoch, so
//! every image meets every rotation. Rotations are counter-clockwise, as `torch.rot90(x, k,
//! dims=(2, 3))` and `selfsup_data::transforms::rotate90`. Images must be square.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use selfsup_models::heads::HeadBlock;
use selfsup_models::{Encoder, Head};

use crate::{scalar, Error, Pretext, Result, StepOutput};

fn flip(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let idx = Tensor::from_vec((0..n as u32).rev().collect::<Vec<u32>>(), n, x.device())?;
    Ok(x.index_select(&idx, dim)?)
}

/// `(N, C, H, W)` rotated by `k * 90` degrees counter-clockwise (`k` mod 4).
pub fn rotate_batch(x: &Tensor, k: usize) -> Result<Tensor> {
    Ok(match k % 4 {
        0 => x.clone(),
        // out[y, x] = in[x, W - 1 - y]
        1 => flip(&x.transpose(2, 3)?.contiguous()?, 2)?,
        2 => flip(&flip(x, 2)?, 3)?,
        // out[y, x] = in[H - 1 - x, y]
        _ => flip(&x.transpose(2, 3)?.contiguous()?, 3)?,
    })
}

/// All `views` with their quarters rotated by 0, 90, 180, 270 degrees, concatenated, and the
/// rotation label (`u32`, 0..4) of every image.
pub fn rotation_batch(views: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let mut xs = Vec::new();
    let mut labels: Vec<u32> = Vec::new();
    for v in views {
        let (n, _, h, w) = v.dims4()?;
        if h != w {
            return Err(Error::Config(format!(
                "rotation prediction needs square images, got {h}x{w}"
            )));
        }
        for k in 0..4 {
            let (a, b) = (k * n / 4, (k + 1) * n / 4);
            if b > a {
                xs.push(rotate_batch(&v.narrow(0, a, b - a)?, k)?);
                labels.extend(std::iter::repeat(k as u32).take(b - a));
            }
        }
    }
    if xs.is_empty() {
        return Err(Error::Config(
            "rotation prediction got an empty batch".into(),
        ));
    }
    let dev = xs[0].device().clone();
    let n = labels.len();
    Ok((Tensor::cat(&xs, 0)?, Tensor::from_vec(labels, n, &dev)?))
}

/// The rotation task: a `Linear-BN-ReLU-Linear(4)` head.
pub struct Rotation {
    head: Head,
}

impl Rotation {
    /// Head on `feature_dim` features with `hidden` units, variables under `vb`.
    pub fn new(feature_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let head = Head::new(
            &[
                HeadBlock::new(feature_dim, hidden, true, true),
                HeadBlock::new(hidden, 4, false, false),
            ],
            vb,
        )?;
        Ok(Self { head })
    }
}

impl Pretext for Rotation {
    fn name(&self) -> &str {
        "rotation"
    }

    fn loss(&self, encoder: &dyn Encoder, views: &[Tensor]) -> Result<StepOutput> {
        let (x, labels) = rotation_batch(views)?;
        let h = encoder.forward_t(&x, true)?;
        let logits = self.head.forward_t(&h, true)?;
        let loss = selfsup_losses::ops::cross_entropy(&logits, &labels)?;
        let acc = scalar(
            &logits
                .argmax(D::Minus1)?
                .eq(&labels)?
                .to_dtype(candle_core::DType::F32)?
                .mean_all()?,
        )?;
        let n = views[0].dim(0)?;
        Ok(StepOutput {
            loss,
            metrics: vec![("rot_acc".into(), acc)],
            embeddings: h.narrow(0, 0, n.min(h.dim(0)?))?.detach(),
        })
    }
}
