//! # selfsup-ops
//!
//! Fast CPU kernels as candle custom ops with an explicit backward, so autograd keeps working.
//! Used by the encoders on the CPU and bypassed on other devices (where candle's own ops, or
//! cuDNN, run).
//!
//! Design choice: **one op per layer, with a closed-form backward.** candle builds its
//! gradient op by op, and every op in the graph costs a zero-filled gradient buffer and an add
//! besides its own backward; a ReLU's backward alone is five full-size ops. So each layer here
//! is a single custom op:
//! - [`conv2d`]: `im2col` of a few samples at a time (sized to stay in cache) and one `gemm`
//!   product per chunk, chunks in parallel; the backward recomputes the columns instead of
//!   keeping them, and skips the input gradient when the input needs none (the image batch).
//!   [`conv2d_fast_forward`] is the same op with a Winograd F(2x2, 3x3) forward for 3x3
//!   stride-1 layers, for inference.
//! - [`batch_norm_train`] (optionally with the ReLU) and [`batch_norm_add_relu_train`]
//!   (`relu(bn(x) + residual)`, a ResNet block's tail): statistics computed once, in `f64`,
//!   shared by forward and backward; [`batch_norm_add_bn_relu_train`] is the tail of a block
//!   with a projection shortcut (`relu(bn(x) + bn_r(r))`, the normalised shortcut never
//!   stored); [`scale_shift`] is eval-mode BatchNorm(+ReLU), [`scale_shift_add_relu`] an
//!   eval-mode block tail.
//! - [`batch_norm_relu_conv2d`]: `conv2d(relu(bn(x)))` (the middle of a ResNet block) as one
//!   op that keeps only its input and output; the rectified tensor is recomputed in the
//!   backward (one element-wise pass), which saves an activation-sized tensor per block.
//! - [`batch_norm_relu_max_pool2d`]: `max_pool2d(relu(bn(x)))` (small-cnn's layers) likewise,
//!   and one `(sample, channel)` plane at a time: the rectified plane and its gradient live
//!   in a buffer that stays in cache, so the rectified tensor (four times the pooled one) and
//!   its gradient are never written out, forward or backward.
//!   [`conv2d_batch_norm_relu_max_pool2d`] puts the convolution before it into the same graph
//!   node, so that the convolution's output gradient (four times the pooled one) skips
//!   candle's zero-filled accumulation buffer.
//! - [`max_pool2d`]: any window/stride/padding, the gradient to the first maximum (PyTorch's
//!   rule; candle 0.11's own max-pool gradient is scaled by `1/k^2`).
//! - [`global_avg_pool`]: `(N, C, H, W) -> (N, C)` in one pass, its backward in another.
//!
//! All are f32 on the CPU (the convolution also f64); callers fall back to candle's ops elsewhere.
#![warn(missing_docs)]

mod avg_pool;
mod batch_norm;
mod bn_conv;
mod bn_pool;
mod conv;
mod conv_bn_pool;
mod im2col;
mod pool;
mod util;
mod winograd;

pub use avg_pool::global_avg_pool;
pub use batch_norm::{
    batch_norm_add_bn_relu_train, batch_norm_add_relu_train, batch_norm_train, channel_stats,
    scale_shift, scale_shift_add_relu, BnAddBnReluOutput, BnStats, BnSync, BnTrainOutput,
    SumAcrossRanks,
};
pub use bn_conv::batch_norm_relu_conv2d;
pub use bn_pool::batch_norm_relu_max_pool2d;
pub use conv_bn_pool::conv2d_batch_norm_relu_max_pool2d;
pub use im2col::{col2im, conv2d, conv2d_fast_forward, im2col, Geometry};
pub use pool::max_pool2d;
