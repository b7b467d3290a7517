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

use crate::util::{output_buffer, scale_shift_row, sq_dev_f64, sum_f64};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

mod add_bn_relu;
mod add_relu;
mod scale_shift;
mod scale_shift_add_relu;
mod train;

pub use add_bn_relu::{batch_norm_add_bn_relu_train, BnAddBnReluOutput, BnStats};
pub use add_relu::batch_norm_add_relu_train;
pub use scale_shift::scale_shift;
pub use scale_shift_add_relu::scale_shift_add_relu;
pub use train::{batch_norm_train, BnTrainOutput};
pub(crate) use train::{bn_backward, BnGrad, GradRows, Scratch, Stored};

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
    if st.len() != c {
        candle_core::bail!("batch norm: statistics of {} channels for {c}", st.len());
    }
    let (scale, shift) = fold_packed(st, wb, eps)?;
    Ok(apply_scale_shift(x, c, hw, &scale, &shift, true))
}

/// [`fold`] with the affine parameters packed as `weight | bias`, checked against the
/// statistics' channels.
pub(crate) fn fold_packed(st: &[(f64, f64)], wb: &[f32], eps: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let c = st.len();
    if wb.len() != 2 * c {
        candle_core::bail!("batch norm: expected {c} weights and biases");
    }
    let (w, b) = wb.split_at(c);
    Ok(fold(st, w, b, eps))
}

/// Synchronised BatchNorm (data-parallel training): how the fused ops sum their per-channel
/// sums over the ranks. `reduce` adds a buffer element-wise over every rank, in place (an MPI
/// all-reduce); every rank has `world` ranks of the same batch shape. The forward's statistics
/// and the input gradient's two sums cover every rank's samples; the weight and bias gradients
/// stay this rank's share (the trainer averages gradients over the ranks). One all-reduce per
/// op forward (the ranks' per-channel statistics) and one per op backward (two sums).
#[derive(Clone)]
pub struct BnSync {
    reduce: SumAcrossRanks,
    rank: usize,
    world: usize,
}

impl BnSync {
    /// Rank `rank` of `world` ranks whose buffers `reduce` adds up in place.
    ///
    /// # Panics
    /// If `rank >= world`.
    pub fn new(rank: usize, world: usize, reduce: SumAcrossRanks) -> Self {
        assert!(rank < world, "rank {rank} of {world} ranks");
        Self {
            reduce,
            rank,
            world,
        }
    }
}

impl std::fmt::Debug for BnSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnSync")
            .field("rank", &self.rank)
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
/// ops; with `sync`, over every rank's batch (one all-reduce that gathers every rank's own
/// statistics).
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
        candle_core::Storage::Cpu(s) => f32s(s, l)?,
        _ => candle_core::bail!("synchronised batch norm: the fused op runs on the CPU"),
    };
    // Each rank's own (mean, biased variance) per channel, both passes over a channel while
    // it is in cache; then one all-reduce that gathers them (each rank fills its own slot of
    // a zeroed buffer) and every rank combines them the same way, in rank order (Chan et
    // al.'s pairwise update for equal counts): mean = the ranks' mean of means,
    // M2 = sum of the ranks' M2 + n sum of (mean_r - mean)^2.
    let own = stats(data, n, c, hw);
    drop(s);
    let world = sync.world;
    let rank_slot = |r: usize| r * 2 * c;
    let mut all = vec![0f64; world * 2 * c];
    let at = rank_slot(sync.rank);
    for (ch, &(mu, var)) in own.iter().enumerate() {
        all[at + ch] = mu;
        all[at + c + ch] = var;
    }
    (sync.reduce)(&mut all)?;
    let n_local = (n * hw) as f64;
    let m = n_local * world as f64;
    let ch: Vec<(f64, f64)> = (0..c)
        .map(|ch| {
            let mean = (0..world).map(|r| all[rank_slot(r) + ch]).sum::<f64>() / world as f64;
            let m2: f64 = (0..world)
                .map(|r| {
                    let (mu, var) = (all[rank_slot(r) + ch], all[rank_slot(r) + c + ch]);
                    var * n_local + n_local * (mu - mean) * (mu - mean)
                })
                .sum();
            (mean, m2 / m)
        })
        .collect();
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

/// Adds a buffer element-wise over every rank, in place.
pub type SumAcrossRanks = Arc<dyn Fn(&mut [f64]) -> Result<()> + Send + Sync>;

/// `relu(x * s[c] + b[c] + r * rs[c] + rb[c])` over `(N, C, hw)`, samples in parallel; `p` is
/// `[s, b, rs, rb]`.
pub(crate) fn add_relu(x: &[f32], r: &[f32], c: usize, hw: usize, p: [&[f32]; 4]) -> Vec<f32> {
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
