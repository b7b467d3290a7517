//! `relu(bn(x) + residual)` in training mode: [`batch_norm_add_relu_train`].

use super::*;
use crate::util::output_buffer;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `relu(bn(x) + residual)`: inputs `(x, cat(weight, bias), residual)`.
struct BnAddRelu {
    eps: f64,
    stats: Stats64,
}

impl CustomOp3 for BnAddRelu {
    fn name(&self) -> &'static str {
        "selfsup-bn-add-relu"
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
        let wb = f32s(s2, l2)?;
        let r = f32s(s3, l3)?;
        if r.len() != x.len() || wb.len() != 2 * c {
            candle_core::bail!("bn-add-relu: residual or parameters do not match the input");
        }
        let (w, b) = wb.split_at(c);
        let st = &self.stats;
        // Every channel writes all of its rows below.
        let mut y = output_buffer(x.len());
        let out = Out(y.as_mut_ptr());
        (0..c).into_par_iter().for_each(|ch| {
            let (mean, var) = st[ch];
            let istd = 1.0 / (var + self.eps).sqrt();
            let scale = (w[ch] as f64 * istd) as f32;
            let shift = (b[ch] as f64 - mean * w[ch] as f64 * istd) as f32;
            for i in 0..n {
                let off = (i * c + ch) * hw;
                // SAFETY: channel `ch` owns the indices (i * c + ch) * hw + j; tasks are disjoint.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.at(off), hw) };
                let src = x[off..off + hw].iter().zip(&r[off..off + hw]);
                for (d, (&v, &rv)) in dst.iter_mut().zip(src) {
                    *d = (v * scale + shift + rv).max(0.0);
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        r: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = wb.dim(0)? / 2;
        let numel = x.elem_count();
        let grad = BnGrad {
            eps: self.eps,
            relu: true,
            stats: self.stats.clone(),
            weight: wb.narrow(0, 0, c)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            emit_g: true,
        };
        let packed = x.apply_op3_no_bwd(&dy.contiguous()?, res, &grad)?;
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let dwb = packed.narrow(0, numel, 2 * c)?;
        let dr = packed.narrow(0, numel + 2 * c, numel)?.reshape(r.shape())?;
        Ok((Some(dx), Some(dwb), Some(dr)))
    }
}

/// `relu(bn(x) + residual)` in training mode (a ResNet block's tail) as one op: f32 on the CPU,
/// differentiable in `x`, `weight`, `bias` and `residual`; it keeps only its output for the
/// backward (the composed ops keep the normalised tensor and the sum as well).
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    eps: f64,
    sync: Option<&BnSync>,
) -> Result<BnTrainOutput> {
    let x = x.contiguous()?;
    if residual.dims() != x.dims() {
        candle_core::bail!(
            "bn-add-relu: residual {:?} does not match input {:?}",
            residual.dims(),
            x.dims()
        );
    }
    let (st, stats) = stats_of(&x, sync)?;
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let y = x.apply_op3(&wb, &residual.contiguous()?, BnAddRelu { eps, stats })?;
    Ok(BnTrainOutput {
        y,
        mean: st.get(0)?,
        var: st.get(1)?,
    })
}
