//! The `Encoder` trait and the encoder registry.

use std::str::FromStr;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::{ConvnetSeed, Error, ResNet, ResNetConfig, Result, SmallCnn, Stem, SMALL_CNN_WIDTHS};

/// An image encoder: `(N, 3, H, W)` images to `(N, D)` features.
///
/// `train` selects batch statistics (and updates the running ones) in BatchNorm layers.
pub trait Encoder: Send + Sync {
    /// Features of a batch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Eval-mode features for inference (kNN, linear probe, embedding export), with **no
    /// gradient** to the input or the weights. candle has no no-grad mode: an eval forward
    /// through weights that are variables records a graph that keeps every activation alive
    /// until the output is dropped. Implementations detach between layers, so each layer's
    /// activations are freed as soon as the next one has run. Values equal
    /// `forward_t(x, false)`.
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x, false)?.detach())
    }
    /// `D`, the feature dimension.
    fn feature_dim(&self) -> usize;
}

/// Which encoder to build.
#[derive(Clone, Debug, PartialEq)]
pub enum EncoderKind {
    /// 4 conv3x3 layers 32-64-128-256 with BN + ReLU, max-pool after the first three, global
    /// average pool (D = 256).
    SmallCnn,
    /// small-cnn's four layers at other channel widths (D = the last one).
    SmallCnnWidths([usize; 4]),
    /// small-cnn with a max-pool after only its first `pools` layers (fewer than 3).
    SmallCnnPools {
        /// Channel widths of the four layers.
        widths: [usize; 4],
        /// Layers followed by a 2x2 max-pool.
        pools: usize,
    },
    /// ResNet-18/34/50 with a stem and a width multiplier.
    ResNet(ResNetConfig),
    /// The seed article's network: conv 5x5 64, ReLU, max-pool 2, flatten, linear to 128.
    ConvnetSeed,
}

impl FromStr for EncoderKind {
    type Err = Error;
    /// `small-cnn`, `convnet-seed`, `resnet18`, `resnet34`, `resnet50`, optionally with a stem
    /// and width: `resnet18-imagenet`, `resnet50-cifar-w2`. small-cnn takes a width
    /// multiplier for every layer (`small-cnn-w1.5`), a width for its last layer, the
    /// feature dimension (`small-cnn-d512`), applied after the multiplier, and the number of
    /// max-pools (`small-cnn-p2`: after the first two layers only).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "small-cnn" => return Ok(Self::SmallCnn),
            "convnet-seed" => return Ok(Self::ConvnetSeed),
            _ => {}
        }
        if let Some(opts) = s.strip_prefix("small-cnn-") {
            return parse_small_cnn(s, opts);
        }
        let mut parts = s.split('-');
        let depth = match parts.next() {
            Some("resnet18") => 18,
            Some("resnet34") => 34,
            Some("resnet50") => 50,
            _ => {
                return Err(Error::Config(format!(
                    "unknown encoder {s:?} (known: small-cnn with optional -wN/-dN/-pN, convnet-seed, resnet18, resnet34, resnet50, with optional -cifar/-imagenet and -wN)"
                )))
            }
        };
        let mut cfg = ResNetConfig {
            depth,
            stem: Stem::Cifar,
            width: 1.0,
        };
        for p in parts {
            match p {
                "cifar" => cfg.stem = Stem::Cifar,
                "imagenet" => cfg.stem = Stem::Imagenet,
                w if w.starts_with('w') => {
                    cfg.width = w[1..]
                        .parse()
                        .map_err(|_| Error::Config(format!("bad width {w:?} in {s:?}")))?
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown encoder option {other:?} in {s:?}"
                    )))
                }
            }
        }
        Ok(Self::ResNet(cfg))
    }
}

fn parse_small_cnn(s: &str, opts: &str) -> Result<EncoderKind> {
    let bad = |what: &str| Error::Config(format!("bad {what} in encoder {s:?}"));
    let mut mult = 1.0f64;
    let mut last = None;
    let mut pools = crate::small_cnn::SMALL_CNN_POOLS;
    for p in opts.split('-') {
        if let Some(w) = p.strip_prefix('w') {
            mult = w.parse().map_err(|_| bad("width multiplier"))?;
            if !(mult.is_finite() && mult > 0.0 && mult <= 64.0) {
                return Err(bad("width multiplier (0 < w <= 64)"));
            }
        } else if let Some(d) = p.strip_prefix('d') {
            let d: usize = d.parse().map_err(|_| bad("feature dimension"))?;
            if d == 0 || d > 65_536 {
                return Err(bad("feature dimension (1..=65536)"));
            }
            last = Some(d);
        } else if let Some(n) = p.strip_prefix('p') {
            pools = n.parse().map_err(|_| bad("max-pool count"))?;
            if pools > crate::small_cnn::SMALL_CNN_POOLS {
                return Err(bad("max-pool count (0..=3)"));
            }
        } else {
            return Err(Error::Config(format!(
                "unknown small-cnn option {p:?} in {s:?} (known: wN, dN, pN)"
            )));
        }
    }
    let mut widths = SMALL_CNN_WIDTHS.map(|c| ((c as f64 * mult).round() as usize).max(1));
    if let Some(d) = last {
        widths[3] = d;
    }
    Ok(if pools != crate::small_cnn::SMALL_CNN_POOLS {
        EncoderKind::SmallCnnPools { widths, pools }
    } else if widths == SMALL_CNN_WIDTHS {
        EncoderKind::SmallCnn
    } else {
        EncoderKind::SmallCnnWidths(widths)
    })
}

/// Build an encoder of `kind` from `vb` (fresh from [`crate::seeded_var_builder`], or loaded
/// weights).
pub fn build_encoder(kind: &EncoderKind, vb: VarBuilder) -> Result<Box<dyn Encoder>> {
    Ok(match kind {
        EncoderKind::SmallCnn => Box::new(SmallCnn::new(vb)?),
        EncoderKind::SmallCnnWidths(w) => Box::new(SmallCnn::with_widths(*w, vb)?),
        EncoderKind::SmallCnnPools { widths, pools } => {
            Box::new(SmallCnn::with_pools(*widths, *pools, vb)?)
        }
        EncoderKind::ResNet(cfg) => Box::new(ResNet::new(cfg, vb)?),
        EncoderKind::ConvnetSeed => Box::new(ConvnetSeed::new(32, vb)?),
    })
}
