//! ResNet-18/34/50 as torchvision builds them (same parameter names and initialisation), with a
//! CIFAR stem (3x3 conv, stride 1, no max-pool) or the ImageNet stem (7x7 stride 2 + 3x3
//! max-pool stride 2), a width multiplier, and no final `fc` (features after global pooling).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::layers::{batch_norm, conv2d_kaiming, global_avg_pool, BatchNorm, Conv2d};
use crate::{Encoder, Error, Result};

/// The first layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// 3x3 conv stride 1, no max-pool (for 32x32 images).
    Cifar,
    /// 7x7 conv stride 2 padding 3, then 3x3 max-pool stride 2 padding 1.
    Imagenet,
}

/// ResNet shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    /// 18, 34 or 50.
    pub depth: usize,
    /// Stem.
    pub stem: Stem,
    /// Width multiplier on the base widths 64-128-256-512.
    pub width: f64,
}

impl ResNetConfig {
    fn blocks(&self) -> Result<([usize; 4], bool)> {
        match self.depth {
            18 => Ok(([2, 2, 2, 2], false)),
            34 => Ok(([3, 4, 6, 3], false)),
            50 => Ok(([3, 4, 6, 3], true)),
            d => Err(Error::Config(format!(
                "ResNet depth {d} is not one of 18, 34, 50"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // conv -> [bn -> relu -> conv]* -> bn + identity -> relu; each bracket is one op on
        // the CPU that keeps no copy of its rectified input.
        let (c0, _) = &self.convs[0];
        let mut z = c0.forward_t(x, train)?;
        for w in self.convs.windows(2) {
            let ((_, bn), (c, _)) = (&w[0], &w[1]);
            z = bn.forward_relu_conv(&z, train, c)?;
        }
        let (_, bn) = self.convs.last().expect("a block has convolutions");
        // relu(bn(z) + shortcut), one op on the CPU, the projection's BatchNorm included.
        let y = match &self.downsample {
            Some((c, bn_d)) => bn.forward_add_bn_relu(&z, &c.forward_t(x, train)?, bn_d, train)?,
            None => bn.forward_add_relu(&z, x, train)?,
        };
        Ok(y)
    }
}

/// A ResNet encoder.
#[derive(Clone, Debug)]
pub struct ResNet {
    stem: Stem,
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    out_dim: usize,
}

impl ResNet {
    /// Build from `vb`.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let (counts, bottleneck) = cfg.blocks()?;
        if cfg.width.is_nan() || cfg.width <= 0.0 || !cfg.width.is_finite() {
            return Err(Error::Config(format!(
                "width multiplier must be positive, got {}",
                cfg.width
            )));
        }
        let base = |c: usize| ((c as f64 * cfg.width).round() as usize).max(1);
        let c0 = base(64);
        let conv1 = match cfg.stem {
            Stem::Cifar => conv2d_kaiming(3, c0, 3, 1, 1, vb.pp("conv1"))?,
            Stem::Imagenet => conv2d_kaiming(3, c0, 7, 2, 3, vb.pp("conv1"))?,
        };
        let bn1 = batch_norm(c0, vb.pp("bn1"))?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut in_c = c0;
        let mut blocks = Vec::new();
        for (li, (&n, planes)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
            let planes = base(planes);
            for bi in 0..n {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let vbb = vb.pp(format!("layer{}.{}", li + 1, bi));
                let out_c = planes * expansion;
                let convs = if bottleneck {
                    vec![
                        (
                            conv2d_kaiming(in_c, planes, 1, 1, 0, vbb.pp("conv1"))?,
                            batch_norm(planes, vbb.pp("bn1"))?,
                        ),
                        (
                            conv2d_kaiming(planes, planes, 3, stride, 1, vbb.pp("conv2"))?,
                            batch_norm(planes, vbb.pp("bn2"))?,
                        ),
                        (
                            conv2d_kaiming(planes, out_c, 1, 1, 0, vbb.pp("conv3"))?,
                            batch_norm(out_c, vbb.pp("bn3"))?,
                        ),
                    ]
                } else {
                    vec![
                        (
                            conv2d_kaiming(in_c, planes, 3, stride, 1, vbb.pp("conv1"))?,
                            batch_norm(planes, vbb.pp("bn1"))?,
                        ),
                        (
                            conv2d_kaiming(planes, planes, 3, 1, 1, vbb.pp("conv2"))?,
                            batch_norm(planes, vbb.pp("bn2"))?,
                        ),
                    ]
                };
                let downsample = if stride != 1 || in_c != out_c {
                    Some((
                        conv2d_kaiming(in_c, out_c, 1, stride, 0, vbb.pp("downsample.0"))?,
                        batch_norm(out_c, vbb.pp("downsample.1"))?,
                    ))
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                in_c = out_c;
            }
        }
        Ok(Self {
            stem: cfg.stem,
            conv1,
            bn1,
            blocks,
            out_dim: in_c,
        })
    }
}

impl ResNet {
    /// The forward; `detach` cuts the graph after the stem and every block (inference).
    fn run(&self, x: &Tensor, train: bool, detach: bool) -> Result<Tensor> {
        let cut = |t: Tensor| if detach { t.detach() } else { t };
        let mut y = cut(match self.stem {
            Stem::Cifar => self
                .bn1
                .forward_act(&self.conv1.forward_t(x, train)?, train, true)?,
            Stem::Imagenet => {
                self.bn1
                    .forward_conv_relu_max_pool(x, &self.conv1, train, 3, 2, 1)?
            }
        });
        for b in &self.blocks {
            y = cut(b.forward_t(&y, train)?);
        }
        Ok(cut(global_avg_pool(&y)?))
    }
}

impl Encoder for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, false)
    }

    fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false, true)
    }

    fn feature_dim(&self) -> usize {
        self.out_dim
    }
}
