//! # selfsup-models
//!
//! Encoders and heads for self-supervised learning, on candle.
//!
//! Design choice: every layer is built from a `VarBuilder` (candle's convention), and fresh
//! weights come from [`seeded_var_builder`], which draws them from a seeded generator with
//! PyTorch's default initialisation for each layer. Parameter names are torchvision's
//! (`conv1.weight`, `layer1.0.bn1.running_mean`, ...) and lightly's for heads
//! (`layers.0.weight`), so weights saved here load in PyTorch and the reverse.
//!
//! - [`Encoder`]: `forward_t(x, train) -> (N, D)`, `feature_dim()`.
//! - [`SmallCnn`], [`ResNet`] (18/34/50, CIFAR or ImageNet stem, width multiplier),
//!   [`ConvnetSeed`]; [`EncoderKind`] parses names such as `resnet18-imagenet`.
//! - [`Head`] from [`HeadBlock`] specs: SimCLR, MoCo, BYOL, SimSiam, Barlow/VICReg, linear.
//! - [`layers`]: `Conv2d`, `Linear`, `BatchNorm` (really trains: batch statistics and
//!   running-statistics updates in train mode), `max_pool2d` with gradients for any stride.
#![warn(missing_docs)]

mod convnet_seed;
mod encoder;
mod error;
pub mod heads;
mod init;
pub mod io;
pub mod layers;
mod resnet;
mod small_cnn;
pub mod whitening;

pub use convnet_seed::ConvnetSeed;
pub use encoder::{build_encoder, Encoder, EncoderKind};
pub use error::{Error, Result};
pub use heads::{Head, HeadBlock};
pub use init::{draw, seeded_var_builder, SeededBackend};
pub use resnet::{ResNet, ResNetConfig, Stem};
pub use small_cnn::{SmallCnn, SMALL_CNN_WIDTHS};
