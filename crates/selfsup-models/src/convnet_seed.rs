//! `convnet-seed`: the small network of the article this project started from, kept as a
//! baseline: `conv5x5(3->64, bias) ReLU maxpool2 flatten linear(64*14*14 -> 128)`.
//! The article's flatten size (64*4*4) does not fit 32x32 input; 64*14*14 does.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{conv2d, linear, max_pool2d, Conv2d, Linear};
use crate::{Encoder, Error, Result};

/// The seed article's convnet.
#[derive(Clone, Debug)]
pub struct ConvnetSeed {
    conv1: Conv2d,
    fc: Linear,
    side: usize,
}

impl ConvnetSeed {
    /// Build for square inputs of side `input` (32 for CIFAR-10).
    pub fn new(input: usize, vb: VarBuilder) -> Result<Self> {
        if input < 6 {
            return Err(Error::Config(format!(
                "convnet-seed needs inputs of at least 6x6, got {input}"
            )));
        }
        let side = (input - 4) / 2;
        Ok(Self {
            conv1: conv2d(3, 64, 5, 1, 0, true, vb.pp("conv1"))?,
            fc: linear(64 * side * side, 128, true, vb.pp("fc"))?,
            side,
        })
    }
}

impl Encoder for ConvnetSeed {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = max_pool2d(&self.conv1.forward(x)?.relu()?, 2, 2, 0)?;
        let (n, c, h, w) = y.dims4()?;
        if (c, h, w) != (64, self.side, self.side) {
            return Err(Error::Config(format!(
                "convnet-seed was built for {0}x{0} inputs, got {1:?}",
                self.side * 2 + 4,
                x.shape()
            )));
        }
        Ok(self.fc.forward(&y.reshape((n, c * h * w))?)?)
    }

    fn feature_dim(&self) -> usize {
        128
    }
}
