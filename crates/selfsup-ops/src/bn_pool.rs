//! `max_pool2d(relu(bn(x)))` in training mode as one op that never keeps `relu(bn(x))`.
//!
//! small-cnn's layers are `conv -> BatchNorm -> ReLU -> max pool`. Composed, the rectified
//! tensor (as large as the convolution's output, four times the pooled one) is stored for the
//! pool's backward and its gradient goes through candle's gradient store (a zero-filled buffer
//! and an add, both full size). Here nothing full-size but the input gradient is ever
//! written: the forward rectifies one `(sample, channel)` plane at a time into a buffer that
//! stays in cache and pools it from there; the backward recomputes each plane's rectified
//! values and scatters the pooled gradient to each window's first maximum (PyTorch's rule, as
//! `max_pool2d`) into another such buffer, masks it by the ReLU and feeds BatchNorm's
//! closed-form backward, once for its sums and once for the input gradient. The arithmetic is
//! that of the three ops composed, value for value.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::batch_norm::{
    bn_backward, dims, f32s, fold_packed, stats_of, BnSync, BnTrainOutput, GradRows, Scratch,
    Stats64,
};
use crate::pool::{pool_bwd_plane, pool_fwd_plane, Pool};
use crate::util::{output_buffer, scale_shift_row};

/// Forward: inputs `(x, cat(weight, bias))`.
pub(crate) struct BnReluPool {
    pub(crate) p: Pool,
    pub(crate) eps: f64,
    pub(crate) stats: Stats64,
}

impl CustomOp2 for BnReluPool {
    fn name(&self) -> &'static str {
        "selfsup-bn-relu-max-pool2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l1)?;
        let x = f32s(s1, l1)?;
        let (scale, shift) = fold_packed(&self.stats, f32s(s2, l2)?, self.eps)?;
        if scale.len() != c || hw != self.p.h * self.p.w {
            candle_core::bail!("bn-relu-max-pool: input {:?} does not fit", l1.dims());
        }
        let (p, ohw) = (self.p, self.p.oh() * self.p.ow());
        // Every output of every plane is written below.
        let mut y = output_buffer(n * c * ohw);
        y.par_chunks_mut((c * ohw).max(1))
            .zip(x.par_chunks((c * hw).max(1)))
            .for_each(|(out, xs)| {
                let mut h = vec![0f32; hw];
                for (ch, (o, xp)) in out.chunks_mut(ohw).zip(xs.chunks(hw)).enumerate() {
                    scale_shift_row(&mut h, xp, scale[ch], shift[ch], true);
                    // Rectified: no NaN.
                    pool_fwd_plane(o, &h, p, true);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, c, p.oh(), p.ow()))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (nx, nwb) = (x.elem_count(), wb.elem_count());
        let wb = wb.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (scale, shift) = fold_packed(&self.stats, &wb, self.eps)?;
        let grad = BnReluPoolGrad {
            p: self.p,
            eps: self.eps,
            stats: self.stats.clone(),
            weight: wb[..wb.len() / 2].to_vec(),
            scale,
            shift,
        };
        let packed = x.apply_op2_no_bwd(&dy.contiguous()?, &grad)?;
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dwb = packed.narrow(0, nx, nwb)?;
        Ok((Some(dx), Some(dwb)))
    }
}

/// Backward: inputs `(x, dy)`, output `dx | dweight | dbias`.
struct BnReluPoolGrad {
    p: Pool,
    eps: f64,
    stats: Stats64,
    weight: Vec<f32>,
    /// BatchNorm folded into one scale and shift per channel, as in the forward.
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// The rows of the gradient reaching BatchNorm's output, recomputed per `(sample, channel)`
/// plane from `x` and the pooled gradient `dy`.
struct PooledRows<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    op: &'a BnReluPoolGrad,
}

impl GradRows for PooledRows<'_> {
    const RECOMPUTED: bool = true;

    fn with_row<R>(
        &self,
        (i, ch): (usize, usize),
        r: Range<usize>,
        s: &mut Scratch,
        f: impl FnOnce(&[f32], Option<&[f32]>) -> R,
    ) -> R {
        let (op, hw) = (self.op, r.len());
        let (c, ohw) = (op.scale.len(), op.p.oh() * op.p.ow());
        let g = &self.dy[(i * c + ch) * ohw..(i * c + ch + 1) * ohw];
        s.h.resize(hw, 0.0);
        scale_shift_row(&mut s.h, &self.x[r], op.scale[ch], op.shift[ch], true);
        // The pool's backward adds into its plane; the rectified plane has no NaN.
        s.dh.clear();
        s.dh.resize(hw, 0.0);
        pool_bwd_plane(&mut s.dh, &s.h, g, op.p, true);
        f(&s.dh, Some(&s.h))
    }
}

impl CustomOp2 for BnReluPoolGrad {
    fn name(&self) -> &'static str {
        "selfsup-bn-relu-max-pool2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l1)?;
        let x = f32s(s1, l1)?;
        let dy = f32s(s2, l2)?;
        let ohw = self.p.oh() * self.p.ow();
        if self.scale.len() != c || hw != self.p.h * self.p.w || dy.len() != n * c * ohw {
            candle_core::bail!(
                "bn-relu-max-pool grad: input {:?} and gradient {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let total = x.len() + 2 * c;
        // bn_backward writes dx, dw and db: every element.
        let mut out = output_buffer(total);
        let rows = PooledRows { x, dy, op: self };
        bn_backward(
            x,
            &rows,
            (n, c, hw),
            &self.stats,
            &self.weight,
            self.eps,
            &mut out,
            false,
        );
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

/// `max_pool2d(relu(batch_norm(x)), k, stride, pad)` in training mode, as one op (f32, CPU)
/// that keeps only its input and output for the backward; differentiable in `x`, `weight` and
/// `bias`. `y` of the result is the pooled output; `mean` and `var` are `x`'s batch statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_max_pool2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    k: usize,
    stride: usize,
    pad: usize,
    sync: Option<&BnSync>,
) -> Result<BnTrainOutput> {
    let x = x.contiguous()?;
    let (_, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "bn-relu-max-pool: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if k == 0 || stride == 0 || 2 * pad > k || h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!(
            "bn-relu-max-pool: kernel {k} stride {stride} padding {pad} does not fit {:?}",
            x.dims()
        );
    }
    let p = Pool {
        h,
        w,
        k,
        stride,
        pad,
    };
    let (st, stats) = stats_of(&x, sync)?;
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let y = x.apply_op2(&wb, BnReluPool { p, eps, stats })?;
    Ok(BnTrainOutput {
        y,
        mean: st.get(0)?,
        var: st.get(1)?,
    })
}
