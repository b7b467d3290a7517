//! `conv2d(relu(bn(x)), w)` in training mode as one op that never keeps `relu(bn(x))`.
//!
//! Inside a ResNet block the normalised, rectified tensor between two convolutions is needed
//! by the backward only as the second convolution's input (for its weight gradient) and as the
//! ReLU's mask. Both come back from `x` and the batch statistics with one element-wise pass, so
//! this op stores nothing but its input and output: one activation-sized tensor less per block
//! (about a fifth of a resnet18 step's activations), and the rectified tensor's gradient never
//! goes through candle's gradient store (a zero-filled buffer and an add).
//!
//! Forward: statistics of `x` (once, in `f64`), `h = relu(x * scale + shift)` into a scratch
//! buffer, the convolution of `h` (the `conv` module's kernel), scratch dropped.
//! Backward: `h` recomputed, the convolution's backward gives `dh` and `dw`, `dh` masked by
//! `h > 0` in place, `h` dropped, then BatchNorm's closed-form backward gives `dx`, `dgamma`,
//! `dbeta`. At most three activation-sized buffers are alive inside the op at any time.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::batch_norm::{
    bn_backward, dims, f32s, rectified, stats_of, BnSync, BnTrainOutput, Stats64, Stored,
};
use crate::conv::{conv_bwd_into, conv_fwd};
use crate::im2col::Geometry;
use crate::util::output_buffer;

/// Forward: inputs `(x, cat(weight, bias), conv weight)`.
struct BnReluConv {
    g: Geometry,
    eps: f64,
    stats: Stats64,
}

impl CustomOp3 for BnReluConv {
    fn name(&self) -> &'static str {
        "selfsup-bn-relu-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let o = l3.dims()[0];
        let h = rectified(f32s(s1, l1)?, l1, &self.stats, f32s(s2, l2)?, self.eps)?;
        let z = conv_fwd(&h, f32s(s3, l3)?, g, o);
        Ok((CpuStorage::F32(z), Shape::from((g.n, o, g.oh(), g.ow()))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        cw: &Tensor,
        _res: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (nx, nwb, ncw) = (x.elem_count(), wb.elem_count(), cw.elem_count());
        let grad = BnReluConvGrad {
            g: self.g,
            eps: self.eps,
            stats: self.stats.clone(),
            wb: wb.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        };
        let packed = x.apply_op3_no_bwd(cw, &dz.contiguous()?, &grad)?;
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dwb = packed.narrow(0, nx, nwb)?;
        let dcw = packed.narrow(0, nx + nwb, ncw)?.reshape(cw.shape())?;
        Ok((Some(dx), Some(dwb), Some(dcw)))
    }
}

/// Backward: inputs `(x, conv weight, dz)`, output `dx | dweight | dbias | dconv_weight`.
struct BnReluConvGrad {
    g: Geometry,
    eps: f64,
    stats: Stats64,
    wb: Vec<f32>,
}

impl CustomOp3 for BnReluConvGrad {
    fn name(&self) -> &'static str {
        "selfsup-bn-relu-conv2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l1)?;
        let x = f32s(s1, l1)?;
        let cw = f32s(s2, l2)?;
        let dz = f32s(s3, l3)?;
        let o = l2.dims()[0];
        let h = rectified(x, l1, &self.stats, &self.wb, self.eps)?;
        // dh must start at zero (the columns are added into it); the conv writes dW straight
        // into the output's tail and bn_backward the rest: every element of `out`.
        let mut dh = vec![0f32; h.len()];
        let total = x.len() + 2 * c + cw.len();
        let mut out = output_buffer(total);
        let (head, dcw) = out.split_at_mut(x.len() + 2 * c);
        conv_bwd_into(&h, cw, dz, self.g, o, Some(&mut dh), dcw);
        let w = &self.wb[..c];
        // `h`, the rectified output, is the ReLU's mask.
        let rows = Stored {
            dy: &dh,
            relu: Some(&h),
        };
        bn_backward(x, &rows, (n, c, hw), &self.stats, w, self.eps, head, false);
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

/// `conv2d(relu(batch_norm(x)), conv_weight)` in training mode, as one op (f32, CPU) that keeps
/// only its input and output for the backward; differentiable in `x`, `weight`, `bias` and
/// `conv_weight` (`(O, C, k, k)`, no bias). `y` of the result is the convolution's output; `mean`
/// and `var` are `x`'s batch statistics (for the running averages).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    conv_weight: &Tensor,
    stride: usize,
    pad: usize,
    sync: Option<&BnSync>,
) -> Result<BnTrainOutput> {
    let x = x.contiguous()?;
    let (n, c, h, w) = x.dims4()?;
    let (_o, cin, k, k2) = conv_weight.dims4()?;
    if cin != c || k != k2 || weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "bn-relu-conv: input {:?}, BatchNorm weight {:?} / bias {:?}, conv weight {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims(),
            conv_weight.dims()
        );
    }
    if k == 0 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!(
            "bn-relu-conv: kernel {k} stride {stride} padding {pad} does not fit {:?}",
            x.dims()
        );
    }
    let g = Geometry {
        n,
        c,
        h,
        w,
        k,
        stride,
        pad,
    };
    let (st, stats) = stats_of(&x, sync)?;
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let y = x.apply_op3(
        &wb,
        &conv_weight.contiguous()?,
        BnReluConv { g, eps, stats },
    )?;
    Ok(BnTrainOutput {
        y,
        mean: st.get(0)?,
        var: st.get(1)?,
    })
}
