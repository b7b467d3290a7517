//! Eval-mode BatchNorm(+ReLU) with folded statistics: [`scale_shift`].

use super::*;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `y = x * scale[c] + shift[c]`, then `max(0, y)` with `relu`: eval-mode batch norm with the
/// running statistics folded into `scale` and `shift`.
struct ScaleShift {
    relu: bool,
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "selfsup-scale-shift"
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
        let scale = f32s(s2, l2)?;
        let shift = f32s(s3, l3)?;
        if scale.len() != c || shift.len() != c {
            candle_core::bail!("scale-shift: expected {c} scales and shifts");
        }
        let y = apply_scale_shift(x, c, hw, scale, shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = scale.dim(0)?;
        let numel = x.elem_count();
        let grad = ScaleShiftGrad {
            relu: self.relu,
            scale: scale.to_vec1::<f32>()?,
        };
        let packed = x.apply_op3_no_bwd(&dy.contiguous()?, res, &grad)?;
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let ds = packed.narrow(0, numel, c)?;
        let db = packed.narrow(0, numel + c, c)?;
        Ok((Some(dx), Some(ds), Some(db)))
    }
}

struct ScaleShiftGrad {
    relu: bool,
    scale: Vec<f32>,
}

impl CustomOp3 for ScaleShiftGrad {
    fn name(&self) -> &'static str {
        "selfsup-scale-shift-grad"
    }
    /// Inputs `(x, dy, y)`; output `dx | dscale | dshift`.
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
        let dy = f32s(s2, l2)?;
        let y = f32s(s3, l3)?;
        let numel = x.len();
        let mut out = vec![0f32; numel + 2 * c];
        let p = Out(out.as_mut_ptr());
        let relu = self.relu;
        (0..c).into_par_iter().for_each(|ch| {
            let a = self.scale[ch];
            let (mut ds, mut db) = (0f64, 0f64);
            for i in 0..n {
                let off = (i * c + ch) * hw;
                // SAFETY: channel `ch` owns these indices of dx.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.at(off), hw) };
                let (mut s1, mut s2) = (0f32, 0f32);
                let rows = x[off..off + hw]
                    .iter()
                    .zip(&dy[off..off + hw])
                    .zip(&y[off..off + hw]);
                for (d, ((&xj, &dyj), &yj)) in dst.iter_mut().zip(rows) {
                    let g = if relu && yj <= 0.0 { 0.0 } else { dyj };
                    *d = g * a;
                    s1 += g * xj;
                    s2 += g;
                }
                ds += s1 as f64;
                db += s2 as f64;
            }
            // SAFETY: slots numel + ch and numel + c + ch belong to channel `ch` alone.
            unsafe {
                *p.at(numel + ch) = ds as f32;
                *p.at(numel + c + ch) = db as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(numel + 2 * c)))
    }
}

/// `x (N, C, ...) * scale[c] + shift[c]`, then a ReLU with `relu`: one op (f32, CPU),
/// differentiable in all three inputs. Eval-mode batch norm folds its running statistics and
/// affine parameters into `scale` and `shift`.
pub fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        ScaleShift { relu },
    )
}
