//! Storage access shared by the ops.

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous input; `op` names the op in the error.
pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The elements of a contiguous `f32` input; `op` names the op in the error.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        _ => candle_core::bail!("{op}: the fused kernel is f32 only"),
    }
}

/// The f32 values of a tensor's storage read in place (a fourth input, which a custom op cannot
/// take), which must be on the CPU.
pub(crate) fn storage_f32s<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => f32s(s, l, op),
        _ => candle_core::bail!("{op}: not on the CPU"),
    }
}

// The row kernels below are compiled twice, for the baseline x86-64 (SSE2) and for AVX2 + FMA,
// and pick at run time (`multiversion`, which caches the choice): the workspace builds for the
// baseline so that the binary runs on any x86-64, and these loops are where the ops spend
// their non-matrix-product time. `gemm` does the same for the matrix products.

/// Independent accumulators of the row reductions below: a float sum is a chain of dependent
/// additions that the compiler may not reorder, so one accumulator runs at the latency of an
/// add; eight fill an AVX register and run at its throughput. The order is fixed, so results
/// do not depend on threads.
const LANES: usize = 8;

/// `Σ v_j` in `f64`.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()
}

/// `Σ (v_j - mean)²` in `f64`.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn sq_dev_f64(v: &[f32], mean: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] as f64 - mean;
            acc[l] += d * d;
        }
    }
    let tail: f64 = rest
        .iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// The gradient reaching a normalised output: `dy`, or 0 where the rectified output `y <= 0`.
/// A bit mask rather than a select, which the compiler turned into a branch per lane. `!(y <=
/// 0)`, not `y > 0`: a NaN output passes its gradient, as the original select did.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn masked(dy: f32, y: f32) -> f32 {
    let keep = (!(y <= 0.0) as u32).wrapping_neg();
    f32::from_bits(dy.to_bits() & keep)
}

/// BatchNorm backward's two row sums, `(Σ g_j, Σ g_j (x_j - mean))`, where `g_j = dy_j`, or
/// (with `y`, the rectified output of a fused ReLU) 0 where `y_j <= 0`.
pub(crate) fn bn_row_sums(x: &[f32], dy: &[f32], y: Option<&[f32]>, mean: f32) -> (f32, f32) {
    match y {
        Some(y) => bn_row_sums_relu(x, dy, y, mean),
        None => bn_row_sums_plain(x, dy, mean),
    }
}

// Each sum below has one accumulator array of its own: with two in one loop the compiler
// paired them across (Σ g, Σ g x) instead of across lanes and kept scalar loads.

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn bn_row_sums_relu(x: &[f32], dy: &[f32], y: &[f32], mean: f32) -> (f32, f32) {
    let n = x.len().min(dy.len()).min(y.len());
    let (x, dy, y) = (&x[..n], &dy[..n], &y[..n]);
    let mut acc = [0f32; LANES];
    for (dc, yc) in dy.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += masked(dc[l], yc[l]);
        }
    }
    let k = n / LANES * LANES;
    let mut b = acc.iter().sum::<f32>();
    for j in k..n {
        b += masked(dy[j], y[j]);
    }
    let mut acc = [0f32; LANES];
    for ((xc, dc), yc) in x
        .chunks_exact(LANES)
        .zip(dy.chunks_exact(LANES))
        .zip(y.chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += masked(dc[l], yc[l]) * (xc[l] - mean);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for j in k..n {
        s += masked(dy[j], y[j]) * (x[j] - mean);
    }
    (b, s)
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn bn_row_sums_plain(x: &[f32], dy: &[f32], mean: f32) -> (f32, f32) {
    let n = x.len().min(dy.len());
    let (x, dy) = (&x[..n], &dy[..n]);
    let mut acc = [0f32; LANES];
    for dc in dy.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += dc[l];
        }
    }
    let k = n / LANES * LANES;
    let b = acc.iter().sum::<f32>() + dy[k..].iter().sum::<f32>();
    let mut acc = [0f32; LANES];
    for (xc, dc) in x.chunks_exact(LANES).zip(dy.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += dc[l] * (xc[l] - mean);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for j in k..n {
        s += dy[j] * (x[j] - mean);
    }
    (b, s)
}

/// BatchNorm backward's input gradient over a row: `d_j = a g_j + bx (x_j - mean) + c0`, `g_j`
/// as in [`bn_row_sums`]; with `g_out`, `g_j` is written there too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_dx_row(
    d: &mut [f32],
    x: &[f32],
    dy: &[f32],
    y: Option<&[f32]>,
    (a, bx, c0, mean): (f32, f32, f32, f32),
    g_out: Option<&mut [f32]>,
) {
    match y {
        Some(y) => bn_dx_row_relu(d, x, dy, y, a, bx, c0, mean),
        None => bn_dx_row_plain(d, x, dy, a, bx, c0, mean),
    }
    if let Some(go) = g_out {
        match y {
            Some(y) => mask_row(go, dy, y),
            None => go.copy_from_slice(dy),
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn bn_dx_row_relu(
    d: &mut [f32],
    x: &[f32],
    dy: &[f32],
    y: &[f32],
    a: f32,
    bx: f32,
    c0: f32,
    mean: f32,
) {
    for (d, ((&xj, &dyj), &yj)) in d.iter_mut().zip(x.iter().zip(dy).zip(y)) {
        *d = a * masked(dyj, yj) + bx * (xj - mean) + c0;
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn bn_dx_row_plain(d: &mut [f32], x: &[f32], dy: &[f32], a: f32, bx: f32, c0: f32, mean: f32) {
    for (d, (&xj, &dyj)) in d.iter_mut().zip(x.iter().zip(dy)) {
        *d = a * dyj + bx * (xj - mean) + c0;
    }
}

/// `d_j = dy_j` where `y_j > 0` (or everywhere without `y`), else 0: the gradient through a
/// ReLU whose output is `y`.
pub(crate) fn masked_row(d: &mut [f32], dy: &[f32], y: Option<&[f32]>) {
    match y {
        Some(y) => mask_row(d, dy, y),
        None => d.copy_from_slice(dy),
    }
}

/// [`bn_dx_row`] without a ReLU over `d`, which holds the output gradient on entry and dx
/// on return (the same arithmetic, so the same values).
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
pub(crate) fn bn_dx_row_in_place(
    d: &mut [f32],
    x: &[f32],
    (a, bx, c0, mean): (f32, f32, f32, f32),
) {
    for (d, &xj) in d.iter_mut().zip(x) {
        *d = a * *d + bx * (xj - mean) + c0;
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn mask_row(d: &mut [f32], dy: &[f32], y: &[f32]) {
    for (d, (&dyj, &yj)) in d.iter_mut().zip(dy.iter().zip(y)) {
        *d = masked(dyj, yj);
    }
}

/// `d_j = s_j a + b`, then `max(0, ·)` with `relu`: BatchNorm's folded affine over a row.
pub(crate) fn scale_shift_row(d: &mut [f32], s: &[f32], a: f32, b: f32, relu: bool) {
    if relu {
        scale_shift_relu_row(d, s, a, b)
    } else {
        scale_shift_plain_row(d, s, a, b)
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn scale_shift_relu_row(d: &mut [f32], s: &[f32], a: f32, b: f32) {
    for (d, &v) in d.iter_mut().zip(s) {
        *d = (v * a + b).max(0.0);
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn scale_shift_plain_row(d: &mut [f32], s: &[f32], a: f32, b: f32) {
    for (d, &v) in d.iter_mut().zip(s) {
        *d = v * a + b;
    }
}

/// A buffer of `n` values for an output whose every element the caller writes. Zeroed: handing
/// out uninitialised memory as `&mut [f32]` is undefined behaviour in Rust even for `f32`, and
/// the zeroing costs about 2% of a small-cnn training step (measured with `perf`); writing
/// through `MaybeUninit` in every kernel would win that back.
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    vec![0f32; n]
}
