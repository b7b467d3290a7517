//! Training-mode BatchNorm(+ReLU): [`batch_norm_train`] and its backward.

use super::*;
use crate::util::{bn_dx_row, bn_dx_row_in_place, bn_row_sums, masked_row, output_buffer};
use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

struct BnTrain {
    eps: f64,
    relu: bool,
    /// Per-channel `(mean, biased var)` of the input, shared with the backward.
    stats: Stats64,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "selfsup-bn-train"
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
        let w = f32s(s2, l2)?;
        let b = f32s(s3, l3)?;
        if w.len() != c || b.len() != c {
            candle_core::bail!("batch norm: expected {c} weights and biases");
        }
        let (scale, shift) = fold(&self.stats, w, b, self.eps);
        let y = apply_scale_shift(x, c, hw, &scale, &shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let numel = x.elem_count();
        let grad = BnGrad {
            eps: self.eps,
            relu: self.relu,
            stats: self.stats.clone(),
            weight: w.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            emit_g: false,
        };
        let packed = x.apply_op3_no_bwd(&dy.contiguous()?, res, &grad)?;
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let dw = packed.narrow(0, numel, c)?;
        let db = packed.narrow(0, numel + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

pub(crate) struct BnGrad {
    pub(crate) eps: f64,
    pub(crate) relu: bool,
    pub(crate) stats: Stats64,
    pub(crate) weight: Vec<f32>,
    /// Also output the masked `dy` (the residual's gradient in `relu(bn(x) + r)`).
    pub(crate) emit_g: bool,
}

impl CustomOp3 for BnGrad {
    fn name(&self) -> &'static str {
        "selfsup-bn-grad"
    }
    /// Inputs `(x, dy, y)`; output `dx | dw | db` flattened.
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
        let extra = if self.emit_g { numel } else { 0 };
        // bn_backward writes dx, dw, db and (with emit_g) the masked dy: every element.
        let mut out = output_buffer(numel + 2 * c + extra);
        let rows = Stored {
            dy,
            relu: self.relu.then_some(y),
        };
        bn_backward(
            x,
            &rows,
            (n, c, hw),
            &self.stats,
            &self.weight,
            self.eps,
            &mut out,
            self.emit_g,
        );
        Ok((CpuStorage::F32(out), Shape::from(numel + 2 * c + extra)))
    }
}

/// Where [`bn_backward`] reads the rows of its output gradient: stored tensors, or values
/// recomputed per row into a task's scratch buffers (which stay in cache, where full-size
/// intermediate tensors would be written to memory and read back).
pub(crate) trait GradRows: Sync {
    /// Whether [`GradRows::with_row`] recomputes its rows (a fused op's backward through
    /// layers after BatchNorm): [`bn_backward`] then keeps each row's masked gradient in dx's
    /// slots between its two passes instead of asking for it twice.
    const RECOMPUTED: bool = false;
    /// Calls `f(dy, relu)` with the row of sample `i`, channel `ch` (elements `range` of the
    /// `(N, C, hw)` input) of the gradient reaching BatchNorm's output and, with a fused ReLU,
    /// of the forward's rectified output, whose non-positive entries mask `dy`. `scratch`
    /// belongs to the calling task.
    fn with_row<R>(
        &self,
        i_ch: (usize, usize),
        range: Range<usize>,
        scratch: &mut Scratch,
        f: impl FnOnce(&[f32], Option<&[f32]>) -> R,
    ) -> R;
}

/// Buffers for recomputed rows, one set per task, reused over its rows.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) h: Vec<f32>,
    pub(crate) dh: Vec<f32>,
}

/// Stored tensors shaped like the input: the output gradient `dy` and, with a fused ReLU, the
/// rectified output `relu`.
pub(crate) struct Stored<'a> {
    pub(crate) dy: &'a [f32],
    pub(crate) relu: Option<&'a [f32]>,
}

impl GradRows for Stored<'_> {
    fn with_row<R>(
        &self,
        _: (usize, usize),
        r: Range<usize>,
        _: &mut Scratch,
        f: impl FnOnce(&[f32], Option<&[f32]>) -> R,
    ) -> R {
        f(&self.dy[r.clone()], self.relu.map(|y| &y[r]))
    }
}

/// BatchNorm's closed-form backward into `out = dx | dw | db`, and with `emit_g` also the
/// gradient reaching the normalised output (`dy` masked by the ReLU) after them, reading the
/// output gradient's rows from `rows`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_backward<R: GradRows>(
    x: &[f32],
    rows: &R,
    (n, c, hw): (usize, usize, usize),
    st: &BatchStats,
    w: &[f32],
    eps: f64,
    out: &mut [f32],
    emit_g: bool,
) {
    let numel = x.len();
    assert!(out.len() >= numel + 2 * c + if emit_g { numel } else { 0 });
    let p = Out(out.as_mut_ptr());
    let m = st.m;
    // Recomputed rows: the first pass leaves the masked gradient in dx's slots, the second
    // turns it into dx in place.
    let keep = R::RECOMPUTED && !emit_g;
    // Sums in f64 across rows, f32 within a row of `hw` values; centred values keep the sums
    // exact enough when the mean is large against the spread.
    let row = |i: usize, ch: usize| (i * c + ch) * hw..(i * c + ch + 1) * hw;
    let sums = |ch: usize| {
        let meanf = st[ch].0 as f32;
        let (mut db, mut dxc) = (0f64, 0f64);
        let mut scratch = Scratch::default();
        for i in 0..n {
            let r = row(i, ch);
            let xr = &x[r.clone()];
            let off = r.start;
            let (sb, sx) = rows.with_row((i, ch), r, &mut scratch, |dy, relu| {
                if keep {
                    // SAFETY: channel `ch` owns these indices of dx.
                    let dst = unsafe { std::slice::from_raw_parts_mut(p.at(off), hw) };
                    masked_row(dst, dy, relu);
                }
                bn_row_sums(xr, dy, relu, meanf)
            });
            db += sb as f64;
            dxc += sx as f64;
        }
        (db, dxc)
    };
    // dx from the (global) sums `db`, `dxc`; dw and db outputs from this rank's `own` sums.
    let finish = |ch: usize, (db, dxc): (f64, f64), own: (f64, f64)| {
        let (mean, var) = st[ch];
        let istd = 1.0 / (var + eps).sqrt();
        let dw = istd * dxc;
        let k = w[ch] as f64 * istd / m;
        // dx = k (m g - db - xh dw) with xh = (x - mean) istd.
        let a = (k * m) as f32;
        let bx = (-k * dw * istd) as f32;
        let c0 = (-k * db) as f32;
        let mut scratch = Scratch::default();
        for i in 0..n {
            let r = row(i, ch);
            let off = r.start;
            // SAFETY: as in the forward pass, channel `ch` owns these indices.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.at(off), hw) };
            // SAFETY: the masked-dy block mirrors dx; channel `ch` owns these indices.
            let g_out = emit_g
                .then(|| unsafe { std::slice::from_raw_parts_mut(p.at(numel + 2 * c + off), hw) });
            let xr = &x[r.clone()];
            if keep {
                bn_dx_row_in_place(dst, xr, (a, bx, c0, mean as f32));
                continue;
            }
            rows.with_row((i, ch), r, &mut scratch, |dy, relu| {
                bn_dx_row(dst, xr, dy, relu, (a, bx, c0, mean as f32), g_out)
            });
        }
        // SAFETY: slots numel + ch and numel + c + ch belong to channel `ch` alone.
        unsafe {
            *p.at(numel + ch) = (istd * own.1) as f32;
            *p.at(numel + c + ch) = own.0 as f32;
        }
    };
    match &st.sync {
        // One pass per channel while its rows are in cache.
        None => (0..c).into_par_iter().for_each(|ch| {
            let s = sums(ch);
            finish(ch, s, s)
        }),
        // Synchronised: every channel's sums, one all-reduce, then dx.
        Some(sync) => {
            let own: Vec<(f64, f64)> = (0..c).into_par_iter().map(sums).collect();
            let mut all: Vec<f64> = own.iter().flat_map(|&(a, b)| [a, b]).collect();
            if let Err(e) = (sync.reduce)(&mut all) {
                // The op's backward has no error channel here; a failed collective cannot be
                // recovered from (the peers are gone), so stop loudly.
                panic!("synchronised batch norm backward: {e}");
            }
            (0..c)
                .into_par_iter()
                .for_each(|ch| finish(ch, (all[2 * ch], all[2 * ch + 1]), own[ch]));
        }
    }
}

/// What [`batch_norm_train`] returns.
#[derive(Clone, Debug)]
pub struct BnTrainOutput {
    /// The normalised (and, with `relu`, rectified) output, shaped like the input.
    pub y: Tensor,
    /// Batch mean per channel, `(C,)`, `f32`, without gradient (for the running averages).
    pub mean: Tensor,
    /// Biased batch variance per channel, `(C,)`, `f32`, without gradient.
    pub var: Tensor,
}

/// Training-mode batch norm of `x (N, C, ...)` with `weight`, `bias` `(C,)`, optionally
/// followed by a ReLU, f32 on the CPU, differentiable in all three inputs. The batch statistics
/// are computed once (in `f64`), used by the forward and the backward, and returned for the
/// running averages.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    sync: Option<&BnSync>,
) -> Result<BnTrainOutput> {
    let x = x.contiguous()?;
    let (st, stats) = stats_of(&x, sync)?;
    let y = x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BnTrain { eps, relu, stats },
    )?;
    Ok(BnTrainOutput {
        y,
        mean: st.get(0)?,
        var: st.get(1)?,
    })
}
