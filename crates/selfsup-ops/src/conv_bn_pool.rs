//! `max_pool2d(relu(bn(conv2d(x, w))))` in training mode as one graph node.
//!
//! small-cnn's layers are a convolution followed by [`batch_norm_relu_max_pool2d`]. As two
//! ops, the convolution's output `z` is a node of candle's graph, and candle accumulates the
//! gradient of every node into a zero-filled tensor of its size with an add (its `GradStore`):
//! for `z`, four times the pooled output, that is a fresh allocation, a memset and a
//! three-stream pass per layer and step, about a tenth of a small-cnn step on two cores.
//! Here `z` is computed outside the graph and kept by the op itself, the forward is the
//! convolution (the [`conv2d`] kernel, no Winograd) then the fused BatchNorm + ReLU + max
//! pool, and the backward hands the pool's `dz` straight to the convolution's backward: the
//! same kernels on the same values, so results are bit-identical to the two ops (tested), and
//! only `dx`, `dw` and the BatchNorm parameters' gradients reach the store.
//!
//! [`batch_norm_relu_max_pool2d`]: crate::batch_norm_relu_max_pool2d
//! [`conv2d`]: crate::conv2d

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::batch_norm::{stats_of, BnSync, BnTrainOutput};
use crate::bn_pool::BnReluPool;
use crate::conv::Conv;
use crate::im2col::conv_geometry;
use crate::pool::Pool;

/// Inputs `(x, conv weight, cat(bn weight, bn bias))`; `z`, the convolution's output, computed
/// before the op and kept for the backward.
struct ConvBnReluPool {
    conv: Conv,
    pool: BnReluPool,
    z: Tensor,
}

impl CustomOp3 for ConvBnReluPool {
    fn name(&self) -> &'static str {
        "selfsup-conv2d-bn-relu-max-pool2d"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, lz) = self.z.storage_and_layout();
        match &*z {
            Storage::Cpu(z) => self.pool.cpu_fwd(z, lz, s3, l3),
            _ => candle_core::bail!(
                "conv-bn-relu-max-pool: the convolution's output is not on the CPU"
            ),
        }
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        wb: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Both backwards run their kernels as ops without a graph: dz never enters the store.
        let (dz, dwb) = self.pool.bwd(&self.z, wb, res, dy)?;
        let Some(dz) = dz else {
            candle_core::bail!("conv-bn-relu-max-pool: the pool's backward gave no dz")
        };
        let (dx, dw) = self.conv.bwd(x, w, &self.z, &dz)?;
        Ok((dx, dw, dwb))
    }
}

/// `max_pool2d(relu(batch_norm(conv2d(x, conv_weight))), k, stride, pad)` in training mode
/// (f32, CPU; a bias-free convolution with a square kernel, `conv_stride` and `conv_pad`), as
/// one node of the graph; differentiable in `x` (when it needs a gradient), `conv_weight`,
/// `weight` and `bias`. `y` of the result is the pooled output, `mean` and `var` the batch
/// statistics of the convolution's output (for the running averages), over the ranks of `sync`
/// when given.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_batch_norm_relu_max_pool2d(
    x: &Tensor,
    conv_weight: &Tensor,
    conv_stride: usize,
    conv_pad: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    k: usize,
    stride: usize,
    pad: usize,
    sync: Option<&BnSync>,
) -> Result<BnTrainOutput> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        candle_core::bail!("conv-bn-relu-max-pool: f32 on the CPU only");
    }
    let x = x.contiguous()?;
    let cw = conv_weight.contiguous()?;
    let g = conv_geometry(&x, &cw, conv_stride, conv_pad)?;
    let o = cw.dim(0)?;
    let (oh, ow) = (g.oh(), g.ow());
    if weight.dims() != [o] || bias.dims() != [o] {
        candle_core::bail!(
            "conv-bn-relu-max-pool: conv weight {:?}, BatchNorm weight {:?} and bias {:?} do not fit",
            cw.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if k == 0 || stride == 0 || 2 * pad > k || oh + 2 * pad < k || ow + 2 * pad < k {
        candle_core::bail!(
            "conv-bn-relu-max-pool: kernel {k} stride {stride} padding {pad} does not fit the {oh}x{ow} convolution output"
        );
    }
    let conv = Conv { g, winograd: false };
    // Outside the graph: the convolution's own node (and its gradient's) is what this op saves.
    let z = x.detach().apply_op2_no_bwd(&cw.detach(), &conv)?;
    let (st, stats) = stats_of(&z, sync)?;
    let p = Pool {
        h: oh,
        w: ow,
        k,
        stride,
        pad,
    };
    let op = ConvBnReluPool {
        conv,
        pool: BnReluPool { p, eps, stats },
        z,
    };
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let y = x.apply_op3(&cw, &wb, op)?;
    Ok(BnTrainOutput {
        y,
        mean: st.get(0)?,
        var: st.get(1)?,
    })
}
