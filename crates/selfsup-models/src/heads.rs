//! Projection and prediction heads from block specs, as lightly builds them.
//!
//! A head is a list of blocks `(in, out, batch_norm, relu)`; each block is a `Linear` (with a
//! bias only when no BatchNorm follows), then BatchNorm1d, then ReLU, numbered as an
//! `nn.Sequential` (`layers.0.weight`, `layers.1.running_mean`, ...) so that state dicts match
//! lightly's heads.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{batch_norm_opts, linear, BatchNorm, Linear};
use crate::Result;

/// One block of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadBlock {
    /// Input dimension.
    pub d_in: usize,
    /// Output dimension.
    pub d_out: usize,
    /// BatchNorm1d after the linear layer.
    pub batch_norm: bool,
    /// ReLU at the end.
    pub relu: bool,
    /// The BatchNorm has a learned scale and shift (PyTorch's `affine`).
    pub affine: bool,
}

impl HeadBlock {
    /// A block.
    pub const fn new(d_in: usize, d_out: usize, batch_norm: bool, relu: bool) -> Self {
        Self {
            d_in,
            d_out,
            batch_norm,
            relu,
            affine: true,
        }
    }

    /// The same block with a BatchNorm without scale and shift (`affine=False`).
    pub const fn without_affine(self) -> Self {
        Self {
            affine: false,
            ..self
        }
    }
}

/// A multi-layer head.
#[derive(Clone, Debug)]
pub struct Head {
    blocks: Vec<(Linear, Option<BatchNorm>, bool)>,
    out_dim: usize,
}

impl Head {
    /// Build from blocks.
    pub fn new(blocks: &[HeadBlock], vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let mut i = 0;
        let mut out = Vec::new();
        for b in blocks {
            let lin = linear(b.d_in, b.d_out, !b.batch_norm, vb.pp(i.to_string()))?;
            i += 1;
            let bn = if b.batch_norm {
                let bn = batch_norm_opts(b.d_out, b.affine, vb.pp(i.to_string()))?;
                i += 1;
                Some(bn)
            } else {
                None
            };
            if b.relu {
                i += 1;
            }
            out.push((lin, bn, b.relu));
        }
        Ok(Self {
            blocks: out,
            out_dim: blocks.last().map(|b| b.d_out).unwrap_or(0),
        })
    }

    /// Apply; `train` selects batch statistics in the BatchNorm layers.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for (lin, bn, relu) in &self.blocks {
            y = lin.forward(&y)?;
            y = match bn {
                Some(bn) => bn.forward_act(&y, train, *relu)?,
                None if *relu => y.relu()?,
                None => y,
            };
        }
        Ok(y)
    }

    /// Output dimension.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
}

/// SimCLR projection head (Chen et al. 2020): `Linear-BN-ReLU-Linear`.
pub fn simclr_projection(d_in: usize, hidden: usize, out: usize) -> Vec<HeadBlock> {
    vec![
        HeadBlock::new(d_in, hidden, true, true),
        HeadBlock::new(hidden, out, false, false),
    ]
}

/// MoCo v2 projection head: `Linear-ReLU-Linear`.
pub fn moco_projection(d_in: usize, hidden: usize, out: usize) -> Vec<HeadBlock> {
    vec![
        HeadBlock::new(d_in, hidden, false, true),
        HeadBlock::new(hidden, out, false, false),
    ]
}

/// BYOL projection or prediction head (Grill et al. 2020): `Linear-BN-ReLU-Linear`
/// (4096 hidden, 256 out in the paper).
pub fn byol_head(d_in: usize, hidden: usize, out: usize) -> Vec<HeadBlock> {
    simclr_projection(d_in, hidden, out)
}

/// SimSiam projection head (Chen & He 2021): three linear layers, each followed by BN, ReLU on
/// the first two.
pub fn simsiam_projection(d_in: usize, hidden: usize, out: usize) -> Vec<HeadBlock> {
    vec![
        HeadBlock::new(d_in, hidden, true, true),
        HeadBlock::new(hidden, hidden, true, true),
        // The output BatchNorm has no scale and shift (SimSiam's code, lightly's head).
        HeadBlock::new(hidden, out, true, false).without_affine(),
    ]
}

/// SimSiam prediction head: `Linear-BN-ReLU-Linear` bottleneck.
pub fn simsiam_prediction(d_in: usize, hidden: usize, out: usize) -> Vec<HeadBlock> {
    simclr_projection(d_in, hidden, out)
}

/// Barlow Twins / VICReg projector: `layers` linear layers, BN + ReLU on all but the last.
pub fn expander(d_in: usize, hidden: usize, out: usize, layers: usize) -> Vec<HeadBlock> {
    let mut v = Vec::new();
    let mut d = d_in;
    for _ in 0..layers.saturating_sub(1) {
        v.push(HeadBlock::new(d, hidden, true, true));
        d = hidden;
    }
    v.push(HeadBlock::new(d, out, false, false));
    v
}

/// A linear classifier (with bias).
pub fn linear_classifier(d_in: usize, classes: usize) -> Vec<HeadBlock> {
    vec![HeadBlock::new(d_in, classes, false, false)]
}
