//! Fused training-mode batch normalisation over dim 1 of `(N, C, ...)`, f32 on the CPU.
//!
//! Forward, per channel `c` over its `m = N * prod(rest)` values: `mean`, biased `var`,
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`, in two passes, parallel over channels.
//! Backward (closed form, same passes): with `xh = (x - mean) * istd`,
//! `db = sum dy`, `dw = sum dy xh`, `dx = weight istd / m (m dy - db - xh dw)`.
//! With `relu`, the output is `max(0, y)` and the backward masks `dy` with `y > 0` first (the
//! saved output is the mask), which removes the ReLU's own op and its five-op candle backward.
//! The statistics are computed once per forward and reused by the backward.
//! This replaces about six full-size candle ops (and their saved copies) per BatchNorm.

use std::sync::Arc;

use crate::util::{bn_dx_row, bn_row_sums, output_buffer, scale_shift_row, sq_dev_f64, sum_f64};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Raw output pointer shared by the per-channel tasks; each task writes only its own channel.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer the pointer was taken from.
        unsafe { self.0.add(i) }
    }
}

pub(crate) fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() < 2 {
        candle_core::bail!("batch norm needs (N, C, ...), got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::util::f32s(s, l, "batch norm")
}

/// Per-channel mean and biased variance, `(mean, var)`.
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let seg = |i: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            let s: f64 = (0..n).map(|i| sum_f64(seg(i))).sum();
            let m = (n * hw) as f64;
            let mean = s / m;
            let q: f64 = (0..n).map(|i| sq_dev_f64(seg(i), mean)).sum();
            (mean, q / m)
        })
        .collect()
}

struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "selfsup-bn-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l)?;
        let st = stats(f32s(s, l)?, n, c, hw);
        let mut out: Vec<f64> = st.iter().map(|p| p.0).collect();
        out.extend(st.iter().map(|p| p.1));
        Ok((CpuStorage::F64(out), Shape::from((2, c))))
    }
}

/// `(2, C)`: batch mean (row 0) and biased variance (row 1) per channel, without gradient,
/// in `f64` (accumulated in `f64`).
pub fn channel_stats(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Stats)
}

/// The batch statistics and the affine parameters folded into one scale and shift per channel.
pub(crate) fn fold(st: &[(f64, f64)], w: &[f32], b: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    st.iter()
        .zip(w.iter().zip(b))
        .map(|(&(mean, var), (&w, &b))| {
            let scale = w as f64 * (1.0 / (var + eps).sqrt());
            (scale as f32, (b as f64 - mean * scale) as f32)
        })
        .unzip()
}

/// `relu(bn(x))` with the statistics folded into `scale`/`shift`.
pub(crate) fn rectified(
    x: &[f32],
    l: &Layout,
    st: &[(f64, f64)],
    wb: &[f32],
    eps: f64,
) -> Result<Vec<f32>> {
    let (_, c, hw) = dims(l)?;
    if wb.len() != 2 * c || st.len() != c {
        candle_core::bail!("batch norm: expected {c} weights and biases");
    }
    let (w, b) = wb.split_at(c);
    let (scale, shift) = fold(st, w, b, eps);
    Ok(apply_scale_shift(x, c, hw, &scale, &shift, true))
}

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

struct BnGrad {
    eps: f64,
    relu: bool,
    stats: Stats64,
    weight: Vec<f32>,
    /// Also output the masked `dy` (the residual's gradient in `relu(bn(x) + r)`).
    emit_g: bool,
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
        let relu = self.relu.then_some(y);
        bn_backward(
            x,
            dy,
            relu,
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

/// BatchNorm's closed-form backward into `out = dx | dw | db`, and with `emit_g` also the
/// gradient reaching the normalised output (`dy` masked by the ReLU) after them. `relu`: the
/// forward's rectified output, whose non-positive entries mask `dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_backward(
    x: &[f32],
    dy: &[f32],
    relu: Option<&[f32]>,
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
    // Sums in f64 across rows, f32 within a row of `hw` values; centred values keep the sums
    // exact enough when the mean is large against the spread.
    let sums = |ch: usize| {
        let meanf = st[ch].0 as f32;
        let (mut db, mut dxc) = (0f64, 0f64);
        for i in 0..n {
            let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
            let (sb, sx) = bn_row_sums(&x[r.clone()], &dy[r.clone()], relu.map(|y| &y[r]), meanf);
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
        for i in 0..n {
            let off = (i * c + ch) * hw;
            // SAFETY: as in the forward pass, channel `ch` owns these indices.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.at(off), hw) };
            // SAFETY: the masked-dy block mirrors dx; channel `ch` owns these indices.
            let g_out = emit_g
                .then(|| unsafe { std::slice::from_raw_parts_mut(p.at(numel + 2 * c + off), hw) });
            let r = off..off + hw;
            bn_dx_row(
                dst,
                &x[r.clone()],
                &dy[r.clone()],
                relu.map(|y| &y[r]),
                (a, bx, c0, mean as f32),
                g_out,
            );
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

/// Adds a buffer element-wise over every rank, in place.
pub type SumAcrossRanks = Arc<dyn Fn(&mut [f64]) -> Result<()> + Send + Sync>;

/// Synchronised BatchNorm (data-parallel training): how the fused ops sum their per-channel
/// sums over the ranks. `reduce` adds a buffer element-wise over every rank, in place (an MPI
/// all-reduce); every rank has `world` ranks of the same batch shape. The forward's statistics
/// and the input gradient's two sums cover every rank's samples; the weight and bias gradients
/// stay this rank's share (the trainer averages gradients over the ranks).
#[derive(Clone)]
pub struct BnSync {
    reduce: SumAcrossRanks,
    world: usize,
}

impl BnSync {
    /// `world` ranks whose sums `reduce` adds up in place.
    pub fn new(world: usize, reduce: SumAcrossRanks) -> Self {
        Self { reduce, world }
    }
}

impl std::fmt::Debug for BnSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnSync")
            .field("world", &self.world)
            .finish()
    }
}

/// Per-channel `(mean, biased var)` over `m` values per channel (every rank's with `sync`),
/// shared by a forward op and its backward.
pub(crate) struct BatchStats {
    ch: Vec<(f64, f64)>,
    m: f64,
    sync: Option<BnSync>,
}

impl std::ops::Deref for BatchStats {
    type Target = [(f64, f64)];
    fn deref(&self) -> &Self::Target {
        &self.ch
    }
}

pub(crate) type Stats64 = Arc<BatchStats>;

/// The batch statistics of `x` as a `(2, C)` f32 tensor (mean, biased variance) and for the
/// ops; with `sync`, over every rank's batch (two all-reduces of `C` sums: the values, then the
/// squared deviations from the global mean).
pub(crate) fn stats_of(x: &Tensor, sync: Option<&BnSync>) -> Result<(Tensor, Stats64)> {
    let Some(sync) = sync else {
        let st = channel_stats(x)?;
        let rows = st.to_vec2::<f64>()?;
        let ch = rows[0]
            .iter()
            .copied()
            .zip(rows[1].iter().copied())
            .collect();
        let m = (x.elem_count() / x.dim(1)?) as f64;
        return Ok((
            st.to_dtype(DType::F32)?,
            Arc::new(BatchStats { ch, m, sync: None }),
        ));
    };
    let (n, c, hw) = dims(x.layout())?;
    let xs = x.contiguous()?;
    let (s, l) = xs.storage_and_layout();
    let data = match &*s {
        candle_core::Storage::Cpu(s) => f32s(s, l)?.to_vec(),
        _ => candle_core::bail!("synchronised batch norm: the fused op runs on the CPU"),
    };
    drop(s);
    let seg = |i: usize, ch: usize| &data[(i * c + ch) * hw..(i * c + ch + 1) * hw];
    let m = (n * hw * sync.world) as f64;
    let mut sums: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| (0..n).map(|i| sum_f64(seg(i, ch))).sum())
        .collect();
    (sync.reduce)(&mut sums)?;
    let mean: Vec<f64> = sums.iter().map(|s| s / m).collect();
    let mut q: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ch| (0..n).map(|i| sq_dev_f64(seg(i, ch), mean[ch])).sum())
        .collect();
    (sync.reduce)(&mut q)?;
    let ch: Vec<(f64, f64)> = mean.iter().zip(&q).map(|(&mu, &q)| (mu, q / m)).collect();
    let mut rows: Vec<f32> = ch.iter().map(|p| p.0 as f32).collect();
    rows.extend(ch.iter().map(|p| p.1 as f32));
    let st = Tensor::from_vec(rows, (2, c), x.device())?;
    Ok((
        st,
        Arc::new(BatchStats {
            ch,
            m,
            sync: Some(sync.clone()),
        }),
    ))
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

/// `relu(x * s[c] + b[c] + r * rs[c] + rb[c])` over `(N, C, hw)`, samples in parallel; `p` is
/// `[s, b, rs, rb]`.
fn add_relu(x: &[f32], r: &[f32], c: usize, hw: usize, p: [&[f32]; 4]) -> Vec<f32> {
    // Every plane of every sample is written below.
    let mut y = output_buffer(x.len());
    let sample = (c * hw).max(1);
    y.par_chunks_mut(sample)
        .zip(x.par_chunks(sample).zip(r.par_chunks(sample)))
        .for_each(|(dst, (xs, rs))| {
            let planes = dst
                .chunks_mut(hw.max(1))
                .zip(xs.chunks(hw.max(1)).zip(rs.chunks(hw.max(1))));
            for (ch, (d, (xp, rp))) in planes.enumerate() {
                let (a, b, ra, rb) = (p[0][ch], p[1][ch], p[2][ch], p[3][ch]);
                for (d, (&v, &rv)) in d.iter_mut().zip(xp.iter().zip(rp)) {
                    *d = (v * a + b + (rv * ra + rb)).max(0.0);
                }
            }
        });
    y
}

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
        bn_backward(x, dy, Some(y), d, &self.stats, w, self.eps, ox, false);
        bn_backward(r, dy, Some(y), d, &self.r_stats, rw, self.eps, or, false);
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

/// `y = x * scale[c] + shift[c]` over `(N, C, hw)`, then `max(0, y)` with `relu`; samples in
/// parallel.
pub(crate) fn apply_scale_shift(
    x: &[f32],
    c: usize,
    hw: usize,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
) -> Vec<f32> {
    // Every plane of every sample is written below.
    let mut y = output_buffer(x.len());
    let sample = (c * hw).max(1);
    y.par_chunks_mut(sample)
        .zip(x.par_chunks(sample))
        .for_each(|(dst, src)| {
            let planes = dst.chunks_mut(hw.max(1)).zip(src.chunks(hw.max(1)));
            for (ch, (d, s)) in planes.enumerate() {
                scale_shift_row(d, s, scale[ch], shift[ch], relu);
            }
        });
    y
}

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
