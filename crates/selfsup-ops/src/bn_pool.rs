//! `max_pool2d(relu(bn(x)))` in training mode as one op that never keeps `relu(bn(x))`.
//!
//! small-cnn's layers are `conv -> BatchNorm -> ReLU -> max pool`. Composed, the rectified
//! tensor (as large as the convolution's output, four times the pooled one) is stored for the
//! pool's backward and its gradient goes through candle's gradient store (a zero-filled buffer
//! and an add, both full size). Here the backward recomputes it from `x` and the batch
//! statistics (one element-wise pass), scatters the pooled gradient to each window's first
//! maximum (PyTorch's rule, as `max_pool2d`), masks it by the ReLU and runs BatchNorm's
//! closed-form backward, all inside one op.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::batch_norm::{
    bn_backward, dims, f32s, rectified, stats_of, BnSync, BnTrainOutput, Stats64,
};
use crate::pool::{pool_bwd_into, pool_fwd, Pool};
use crate::util::output_buffer;

/// Forward: inputs `(x, cat(weight, bias))`.
struct BnReluPool {
    p: Pool,
    eps: f64,
    stats: Stats64,
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
        let (n, c) = (l1.dims()[0], l1.dims()[1]);
        let h = rectified(f32s(s1, l1)?, l1, &self.stats, f32s(s2, l2)?, self.eps)?;
        let y = pool_fwd(&h, self.p);
        Ok((
            CpuStorage::F32(y),
            Shape::from((n, c, self.p.oh(), self.p.ow())),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (nx, nwb) = (x.elem_count(), wb.elem_count());
        let grad = BnReluPoolGrad {
            p: self.p,
            eps: self.eps,
            stats: self.stats.clone(),
            wb: wb.to_dtype(DType::F32)?.to_vec1::<f32>()?,
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
    wb: Vec<f32>,
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
        let h = rectified(x, l1, &self.stats, &self.wb, self.eps)?;
        let mut dh = vec![0f32; h.len()];
        pool_bwd_into(&h, dy, self.p, &mut dh);
        let total = x.len() + 2 * c;
        // bn_backward writes dx, dw and db: every element.
        let mut out = output_buffer(total);
        let w = &self.wb[..c];
        bn_backward(
            x,
            &dh,
            Some(&h),
            (n, c, hw),
            &self.stats,
            w,
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
