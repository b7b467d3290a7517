//! # selfsup-ops
//!
//! Fast CPU kernels as candle custom ops with an explicit backward, so autograd keeps working.
//! Used by the encoders on the CPU and bypassed on other devices (where candle's own ops, or
//! cuDNN, run).
//!
//! Design choice: a convolution is `im2col` (a custom op, parallel over its rows) followed by
//! **one** large matrix product over the whole batch (`W (O, C k k) x cols (C k k, N L)`), which
//! candle hands to the `gemm` crate. Its gradients are two more large products (candle's matmul
//! backward) and `col2im`, the adjoint of `im2col` (another custom op). This replaces candle
//! 0.11's CPU input gradient, a single-threaded `conv_transpose2d`.
#![warn(missing_docs)]

mod batch_norm;
mod conv;
mod im2col;
mod pool;

pub use batch_norm::{
    batch_norm_add_relu_train, batch_norm_train, channel_stats, scale_shift, BnTrainOutput,
};
pub use im2col::{col2im, conv2d, im2col, Geometry};
pub use pool::max_pool2d;
