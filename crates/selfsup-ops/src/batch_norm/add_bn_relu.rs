//! `relu(bn(x) + bn_r(residual))` in training mode: [`batch_norm_add_bn_relu_train`].

use super::*;
use crate::util::output_buffer;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `relu(bn(x) + bn_r(r))`: inputs `(x, r, cat(weight, bias, r_weight, r_bias))`.
struct BnAddBnRelu {
    eps: f64,
    stats: Stats64,
    r_stats: Stats64,
}

impl CustomOp3 for BnAddBnRelu {
    fn name(&self) -> &'static str {
        "selfsup-bn-add-bn-relu"
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
        let (_, c, hw) = dims(l1)?;
        let x = f32s(s1, l1)?;
        let r = f32s(s2, l2)?;
        let p = f32s(s3, l3)?;
        if r.len() != x.len() || p.len() != 4 * c {
            candle_core::bail!("bn-add-bn-relu: residual or parameters do not match the input");
        }
        let (scale, shift) = fold(&self.stats, &p[..c], &p[c..2 * c], self.eps);
        let (r_scale, r_shift) = fold(&self.r_stats, &p[2 * c..3 * c], &p[3 * c..], self.eps);
        let y = add_relu(x, r, c, hw, [&scale, &shift, &r_scale, &r_shift]);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        p: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = p.dim(0)? / 4;
        let numel = x.elem_count();
        let grad = BnAddBnReluGrad {
            eps: self.eps,
            stats: self.stats.clone(),
            r_stats: self.r_stats.clone(),
            p: p.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            y: res.contiguous()?,
        };
        let packed = x.apply_op3_no_bwd(r, &dy.contiguous()?, &grad)?;
        let m = numel + 2 * c;
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let dr = packed.narrow(0, m, numel)?.reshape(r.shape())?;
        let dp = Tensor::cat(
            &[
                packed.narrow(0, numel, 2 * c)?,
                packed.narrow(0, m + numel, 2 * c)?,
            ],
            0,
        )?;
        Ok((Some(dx), Some(dr), Some(dp)))
    }
}

struct BnAddBnReluGrad {
    eps: f64,
    stats: Stats64,
    r_stats: Stats64,
    p: Vec<f32>,
    /// The forward's output (the ReLU's mask), read in place: a fourth input, which a custom
    /// op cannot take.
    y: Tensor,
}

impl CustomOp3 for BnAddBnReluGrad {
    fn name(&self) -> &'static str {
        "selfsup-bn-add-bn-relu-grad"
    }
    /// Inputs `(x, r, dy)`; output `dx | dw | db | dr | dr_w | dr_b`.
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
        let r = f32s(s2, l2)?;
        let dy = f32s(s3, l3)?;
        let (ys, yl) = self.y.storage_and_layout();
        let y = crate::util::storage_f32s(&ys, yl, "bn-add-bn-relu output")?;
        if r.len() != x.len() || dy.len() != x.len() || y.len() != x.len() {
            candle_core::bail!("bn-add-bn-relu grad: inputs of different sizes");
        }
        let m = x.len() + 2 * c;
        // Two bn_backward calls write all of both halves.
        let mut out = output_buffer(2 * m);
        let (ox, or) = out.split_at_mut(m);
        let (w, rw) = (&self.p[..c], &self.p[2 * c..3 * c]);
        let d = (n, c, hw);
        let rows = Stored { dy, relu: Some(y) };
        bn_backward(x, &rows, d, &self.stats, w, self.eps, ox, false);
        bn_backward(r, &rows, d, &self.r_stats, rw, self.eps, or, false);
        Ok((CpuStorage::F32(out), Shape::from(2 * m)))
    }
}

/// What [`batch_norm_add_bn_relu_train`] returns: the output and both inputs' batch statistics.
#[derive(Clone, Debug)]
pub struct BnAddBnReluOutput {
    /// `relu(bn(x) + bn_r(residual))`.
    pub y: Tensor,
    /// `x`'s batch statistics.
    pub x: BnStats,
    /// The residual's batch statistics.
    pub residual: BnStats,
}

/// Batch mean and biased variance per channel, `(C,)`, `f32`, without gradient.
#[derive(Clone, Debug)]
pub struct BnStats {
    /// Mean.
    pub mean: Tensor,
    /// Biased variance.
    pub var: Tensor,
}

/// `relu(bn(x) + bn_r(residual))` in training mode, two BatchNorms with their own parameters
/// (a ResNet block whose shortcut is a strided 1x1 convolution and a BatchNorm) as one op: f32
/// on the CPU, differentiable in all six inputs; it keeps only its output, never the
/// normalised shortcut.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_add_bn_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    r_weight: &Tensor,
    r_bias: &Tensor,
    eps: f64,
    sync: Option<&BnSync>,
) -> Result<BnAddBnReluOutput> {
    let x = x.contiguous()?;
    let residual = residual.contiguous()?;
    let c = x.dim(1)?;
    if residual.dims() != x.dims()
        || [weight, bias, r_weight, r_bias]
            .iter()
            .any(|t| t.dims() != [c])
    {
        candle_core::bail!(
            "bn-add-bn-relu: residual {:?} or parameters do not match input {:?}",
            residual.dims(),
            x.dims()
        );
    }
    let (st, stats) = stats_of(&x, sync)?;
    let (rst, r_stats) = stats_of(&residual, sync)?;
    let p = Tensor::cat(&[weight, bias, r_weight, r_bias], 0)?;
    let y = x.apply_op3(
        &residual,
        &p,
        BnAddBnRelu {
            eps,
            stats,
            r_stats,
        },
    )?;
    Ok(BnAddBnReluOutput {
        y,
        x: BnStats {
            mean: st.get(0)?,
            var: st.get(1)?,
        },
        residual: BnStats {
            mean: rst.get(0)?,
            var: rst.get(1)?,
        },
    })
}
