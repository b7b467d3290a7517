//! Eval-mode block tail `relu(x s + b + r rs + rb)`: [`scale_shift_add_relu`].

use super::*;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `relu(x * s + b + r * rs + rb)` per channel: inputs `(x, r, cat(s, b, rs, rb))`.
struct ScaleShiftAddRelu;

impl CustomOp3 for ScaleShiftAddRelu {
    fn name(&self) -> &'static str {
        "selfsup-scale-shift-add-relu"
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
            candle_core::bail!("scale-shift-add-relu: residual or parameters do not match");
        }
        let (s, rest) = p.split_at(c);
        let (b, rest) = rest.split_at(c);
        let (rs, rb) = rest.split_at(c);
        let y = add_relu(x, r, c, hw, [s, b, rs, rb]);
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
        let numel = x.elem_count();
        let grad = ScaleShiftAddReluGrad {
            p: p.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            y: res.contiguous()?,
        };
        let packed = x.apply_op3_no_bwd(r, &dy.contiguous()?, &grad)?;
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let dr = packed.narrow(0, numel, numel)?.reshape(r.shape())?;
        let dp = packed.narrow(0, 2 * numel, p.elem_count())?;
        Ok((Some(dx), Some(dr), Some(dp)))
    }
}

struct ScaleShiftAddReluGrad {
    p: Vec<f32>,
    /// The forward's output (the ReLU's mask), read in place (a fourth input).
    y: Tensor,
}

impl CustomOp3 for ScaleShiftAddReluGrad {
    fn name(&self) -> &'static str {
        "selfsup-scale-shift-add-relu-grad"
    }
    /// Inputs `(x, r, dy)`; output `dx | dr | ds | db | drs | drb`.
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
        let y = crate::util::storage_f32s(&ys, yl, "scale-shift-add-relu output")?;
        let numel = x.len();
        if r.len() != numel || dy.len() != numel || y.len() != numel {
            candle_core::bail!("scale-shift-add-relu grad: inputs of different sizes");
        }
        let p = &self.p;
        let mut out = vec![0f32; 2 * numel + 4 * c];
        let o = Out(out.as_mut_ptr());
        (0..c).into_par_iter().for_each(|ch| {
            let (a, ra) = (p[ch], p[2 * c + ch]);
            let (mut sx, mut sg, mut sr) = (0f64, 0f64, 0f64);
            for i in 0..n {
                let off = (i * c + ch) * hw;
                // SAFETY: channel `ch` owns these indices of dx and dr.
                let dxs = unsafe { std::slice::from_raw_parts_mut(o.at(off), hw) };
                let drs = unsafe { std::slice::from_raw_parts_mut(o.at(numel + off), hw) };
                let (mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32);
                let rows = dy[off..off + hw]
                    .iter()
                    .zip(&y[off..off + hw])
                    .zip(x[off..off + hw].iter().zip(&r[off..off + hw]));
                for ((dxj, drj), ((&g, &yj), (&xj, &rj))) in dxs.iter_mut().zip(drs).zip(rows) {
                    let g = if yj > 0.0 { g } else { 0.0 };
                    *dxj = g * a;
                    *drj = g * ra;
                    s1 += g * xj;
                    s2 += g;
                    s3 += g * rj;
                }
                sx += s1 as f64;
                sg += s2 as f64;
                sr += s3 as f64;
            }
            // SAFETY: these four slots belong to channel `ch` alone.
            unsafe {
                *o.at(2 * numel + ch) = sx as f32;
                *o.at(2 * numel + c + ch) = sg as f32;
                *o.at(2 * numel + 2 * c + ch) = sr as f32;
                *o.at(2 * numel + 3 * c + ch) = sg as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(2 * numel + 4 * c)))
    }
}

/// `relu(x * scale[c] + shift[c] + residual * r_scale[c] + r_shift[c])` over `(N, C, ...)`: one
/// op (f32, CPU), differentiable in all six inputs. Eval-mode ResNet block tails: the block's
/// BatchNorm folded into `scale`/`shift`, the shortcut's into `r_scale`/`r_shift` (ones and
/// zeros for an identity shortcut); it replaces a scale/shift, an add and a ReLU, each a full
/// pass and a fresh buffer.
pub fn scale_shift_add_relu(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: &Tensor,
    r_scale: &Tensor,
    r_shift: &Tensor,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let c = x.dim(1)?;
    if residual.dims() != x.dims()
        || [scale, shift, r_scale, r_shift]
            .iter()
            .any(|t| t.dims() != [c])
    {
        candle_core::bail!(
            "scale-shift-add-relu: residual {:?} or parameters do not match input {:?}",
            residual.dims(),
            x.dims()
        );
    }
    let p = Tensor::cat(&[scale, shift, r_scale, r_shift], 0)?;
    x.apply_op3(&residual.contiguous()?, &p, ScaleShiftAddRelu)
}
