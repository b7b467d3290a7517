//! `small-cnn`: the CPU workhorse.
//!
//! `conv3x3(3->32) BN ReLU maxpool2 | conv3x3(32->64) BN ReLU maxpool2 |
//! conv3x3(64->128) BN ReLU maxpool2 | conv3x3(128->256) BN ReLU | global average pool`,
//! D = 256. Convolutions have no bias (BatchNorm follows); names `conv{i}`, `bn{i}`.
//! [`SmallCnn::with_widths`] builds the same four layers at other widths (`small-cnn-w2`,
//! `small-cnn-d512` in the encoder registry); [`SmallCnn::with_pools`] keeps only the first
//! `pools` max-pools (`small-cnn-p2`: the last layer sees a 6x6 map of a 24 px view instead of
//! 3x3, for about twice the FLOPs).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::layers::{batch_norm, conv2d, global_avg_pool, BatchNorm, Conv2d};
use crate::{Encoder, Result};

/// Channel widths of the four layers of the standard `small-cnn`.
pub const SMALL_CNN_WIDTHS: [usize; 4] = [32, 64, 128, 256];

/// The small CNN.
#[derive(Clone, Debug)]
pub struct SmallCnn {
    layers: Vec<(Conv2d, BatchNorm)>,
    dim: usize,
    /// Layers followed by a 2x2 max-pool (the first `pools`; 3 in the standard network).
    pools: usize,
}

/// Max-pools of the standard `small-cnn` (after each of its first three layers).
pub const SMALL_CNN_POOLS: usize = 3;

impl SmallCnn {
    /// Build the standard widths ([`SMALL_CNN_WIDTHS`]) from `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::with_widths(SMALL_CNN_WIDTHS, vb)
    }

    /// Build with channel widths `widths` (all positive); D = `widths[3]`.
    pub fn with_widths(widths: [usize; 4], vb: VarBuilder) -> Result<Self> {
        Self::with_pools(widths, SMALL_CNN_POOLS, vb)
    }

    /// Build with channel widths `widths` and a 2x2 max-pool after each of the first `pools`
    /// layers (0 to 3).
    pub fn with_pools(widths: [usize; 4], pools: usize, vb: VarBuilder) -> Result<Self> {
        if pools > SMALL_CNN_POOLS {
            return Err(crate::Error::Config(format!(
                "small-cnn has at most {SMALL_CNN_POOLS} max-pools, got {pools}"
            )));
        }
        if widths.contains(&0) {
            return Err(crate::Error::Config(format!(
                "small-cnn widths must be positive, got {widths:?}"
            )));
        }
        let mut layers = Vec::new();
        let mut c_in = 3;
        for (i, &c) in widths.iter().enumerate() {
            let conv = conv2d(c_in, c, 3, 1, 1, false, vb.pp(format!("conv{}", i + 1)))?;
            let bn = batch_norm(c, vb.pp(format!("bn{}", i + 1)))?;
            layers.push((conv, bn));
            c_in = c;
        }
        Ok(Self {
            layers,
            dim: widths[3],
            pools,
        })
    }
}

impl SmallCnn {
    /// The forward; `detach` cuts the graph after every layer (inference).
    fn run(&self, x: &Tensor, train: bool, detach: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, (conv, bn)) in self.layers.iter().enumerate() {
            x = if i < self.pools {
                // One graph node on the CPU in training: no copy of the rectified tensor, and
                // the convolution's output gradient never goes through candle's store.
                bn.forward_conv_relu_max_pool(&x, conv, train, 2, 2, 0)?
            } else {
                bn.forward_act(&conv.forward_t(&x, train)?, train, true)?
            };
            if detach {
                x = x.detach();
            }
        }
        let y = global_avg_pool(&x)?;
        Ok(if detach { y.detach() } else { y })
    }
}

impl Encoder for SmallCnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, false)
    }

    fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false, true)
    }

    fn feature_dim(&self) -> usize {
        self.dim
    }
}
