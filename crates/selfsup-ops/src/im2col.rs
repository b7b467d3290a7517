//! `im2col` / `col2im` and the convolution built on them.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Shape of a square-kernel convolution over `(N, C, H, W)` inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub pad: usize,
}

impl Geometry {
    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Rows of the column matrix, `C k k`.
    pub fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Columns of the column matrix, `N OH OW`.
    pub fn cols(&self) -> usize {
        self.n * self.oh() * self.ow()
    }
}

pub(crate) trait Float:
    Copy + Default + Send + Sync + std::ops::AddAssign + 'static
{
    fn one() -> Self;
}
impl Float for f32 {
    fn one() -> Self {
        1.0
    }
}
impl Float for f64 {
    fn one() -> Self {
        1.0
    }
}

/// One sample's part of one row `(c, ky, kx)` of the column matrix: `d[oy OW + ox] =
/// plane[oy s + ky - p, ox s + kx - p]`, 0 outside; every entry of `d` is written.
fn im2col_row<T: Float>(plane: &[T], g: Geometry, ky: usize, kx: usize, d: &mut [T]) {
    if g.stride == 1 && g.oh() == g.h && g.ow() == g.w && g.w > g.pad {
        return im2col_row_same(plane, g, ky, kx, d);
    }
    let (oh, ow) = (g.oh(), g.ow());
    for oy in 0..oh {
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        let drow = &mut d[oy * ow..(oy + 1) * ow];
        if iy < 0 || iy >= g.h as isize {
            drow.fill(T::default());
            continue;
        }
        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        if g.stride == 1 {
            // Contiguous run: ix = ox + kx - p.
            let lo = g.pad.saturating_sub(kx).min(ow); // first ox with ix >= 0
            let hi = (g.w + g.pad).saturating_sub(kx).min(ow).max(lo); // first ox with ix >= w
            drow[..lo].fill(T::default());
            if lo < hi {
                let s0 = lo + kx - g.pad;
                drow[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
            }
            drow[hi..].fill(T::default());
        } else {
            for (ox, v) in drow.iter_mut().enumerate() {
                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                *v = if ix >= 0 && ix < g.w as isize {
                    src[ix as usize]
                } else {
                    T::default()
                };
            }
        }
    }
}

/// One kernel offset `(ky, kx)` of a "same" convolution, one sample's plane: output index `i`
/// reads input index `i + off`.
#[derive(Clone, Copy)]
struct SameShift {
    w: usize,
    /// Output rows `oy0..oy1` read input rows inside the image.
    oy0: usize,
    oy1: usize,
    off: isize,
    /// Output indices `lo..hi`: those rows, clipped so that `i + off` stays in the plane;
    /// what the clipping leaves out lies in padding columns of the first or the last row.
    lo: usize,
    hi: usize,
    /// Padding columns per row (`|kx - p|`), from column `first`: `ox < p - kx` on the left,
    /// `ox >= w - (kx - p)` on the right.
    edge: usize,
    first: usize,
}

impl SameShift {
    fn new(g: Geometry, ky: usize, kx: usize) -> Self {
        let (h, w) = (g.h, g.w);
        let dy = ky as isize - g.pad as isize;
        let dx = kx as isize - g.pad as isize;
        let oy0 = (-dy).clamp(0, h as isize) as usize;
        let oy1 = (h as isize - dy).clamp(oy0 as isize, h as isize) as usize;
        let off = dy * w as isize + dx;
        let lo = (oy0 * w).max((-off).max(0) as usize);
        let hi = (oy1 * w).min(((h * w) as isize - off).max(0) as usize);
        let edge = dx.unsigned_abs();
        let first = if dx < 0 { 0 } else { w - edge };
        Self {
            w,
            oy0,
            oy1,
            off,
            lo,
            hi,
            edge,
            first,
        }
    }

    /// The input index output index `i` reads.
    fn input(&self, i: usize) -> usize {
        (i as isize + self.off) as usize
    }

    /// The output indices of output rows `rows` in padding columns (`edge` per row).
    fn pads(&self, rows: std::ops::Range<usize>) -> impl Iterator<Item = usize> + Clone + '_ {
        rows.flat_map(move |r| r * self.w + self.first..r * self.w + self.first + self.edge)
    }
}

/// [`im2col_row`] for a "same" convolution (stride 1, output the input's size): the output
/// rows of one `(ky, kx)` read consecutive input rows at one shift, so one copy moves them all
/// (instead of one short copy per row: a 3x3 map's rows are 3 values), and the columns the
/// shift moved past the image's edge (the padding, `|kx - p|` per row) are zeroed after.
fn im2col_row_same<T: Float>(plane: &[T], g: Geometry, ky: usize, kx: usize, d: &mut [T]) {
    let s = SameShift::new(g, ky, kx);
    d[..s.oy0 * s.w].fill(T::default());
    d[s.oy1 * s.w..g.h * s.w].fill(T::default());
    if s.oy0 == s.oy1 {
        return;
    }
    d[s.lo..s.hi].copy_from_slice(&plane[s.input(s.lo)..s.input(s.hi)]);
    for i in s.pads(s.oy0..s.oy1) {
        d[i] = T::default();
    }
}

/// The adjoint of [`im2col_row`]: add `src` (one sample's part of row `(c, ky, kx)`) into
/// `plane`.
fn col2im_row<T: Float>(src: &[T], g: Geometry, ky: usize, kx: usize, plane: &mut [T]) {
    if g.stride == 1 && g.oh() == g.h && g.ow() == g.w && g.w > g.pad && g.pad <= KEEP / 8 {
        return col2im_row_same(src, g, ky, kx, plane);
    }
    let ow = g.ow();
    for oy in 0..g.oh() {
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        let prow = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        let srow = &src[oy * ow..(oy + 1) * ow];
        if g.stride == 1 {
            let lo = g.pad.saturating_sub(kx).min(ow);
            let hi = (g.w + g.pad).saturating_sub(kx).min(ow).max(lo);
            if lo < hi {
                let s0 = lo + kx - g.pad;
                for (p, &v) in prow[s0..s0 + (hi - lo)].iter_mut().zip(&srow[lo..hi]) {
                    *p += v;
                }
            }
        } else {
            for (ox, &v) in srow.iter().enumerate() {
                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                if ix >= 0 && ix < g.w as isize {
                    prow[ix as usize] += v;
                }
            }
        }
    }
}

/// Plane values [`col2im_row_same`] keeps aside per block of rows.
const KEEP: usize = 64;

/// [`col2im_row`] for a "same" convolution, the adjoint of [`im2col_row_same`]: one add over
/// the rows' consecutive values instead of one short add per row. The padding columns' values
/// land, in that one add, on plane values that get no other addend from this `(ky, kx)` (the
/// shift is one-to-one), so those are put back as they were: the result is that of the row by
/// row add, bit for bit.
fn col2im_row_same<T: Float>(src: &[T], g: Geometry, ky: usize, kx: usize, plane: &mut [T]) {
    let s = SameShift::new(g, ky, kx);
    if s.oy0 == s.oy1 {
        return;
    }
    let rows = KEEP.checked_div(s.edge).unwrap_or(s.oy1 - s.oy0);
    let mut oy = s.oy0;
    while oy < s.oy1 {
        let end = (oy + rows).min(s.oy1);
        let (a, b) = ((oy * s.w).max(s.lo), (end * s.w).min(s.hi));
        let mut keep = [T::default(); KEEP];
        let pads = s.pads(oy..end).filter(|i| (a..b).contains(i));
        for (k, i) in pads.clone().enumerate() {
            keep[k] = plane[s.input(i)];
        }
        for (p, &v) in plane[s.input(a)..s.input(b)].iter_mut().zip(&src[a..b]) {
            *p += v;
        }
        for (k, i) in pads.enumerate() {
            plane[s.input(i)] = keep[k];
        }
        oy = end;
    }
}

/// `x (N, C, H, W)` to `cols (C k k, N OH OW)`: row `(c, ky, kx)`, column `(n, oy, ox)` holds
/// `x[n, c, oy s + ky - p, ox s + kx - p]` (0 outside). Parallel over rows.
pub(crate) fn im2col_cpu<T: Float>(x: &[T], g: Geometry) -> Vec<T> {
    let l = g.oh() * g.ow();
    let mut out = vec![T::default(); g.rows() * g.cols()];
    out.par_chunks_mut(g.cols())
        .enumerate()
        .for_each(|(row, dst)| {
            let (c, ky, kx) = (row / (g.k * g.k), (row / g.k) % g.k, row % g.k);
            for n in 0..g.n {
                let plane = &x[(n * g.c + c) * g.h * g.w..(n * g.c + c + 1) * g.h * g.w];
                im2col_row(plane, g, ky, kx, &mut dst[n * l..(n + 1) * l]);
            }
        });
    out
}

/// The column matrix `(C k k, nn OH OW)` of samples `n0 .. n0 + nn` only, into `out` (every
/// entry written), on the calling thread.
pub(crate) fn im2col_samples<T: Float>(x: &[T], g: Geometry, n0: usize, nn: usize, out: &mut [T]) {
    let l = g.oh() * g.ow();
    let width = nn * l;
    for (row, dst) in out[..g.rows() * width].chunks_mut(width).enumerate() {
        let (c, ky, kx) = (row / (g.k * g.k), (row / g.k) % g.k, row % g.k);
        for s in 0..nn {
            let plane = &x[((n0 + s) * g.c + c) * g.h * g.w..((n0 + s) * g.c + c + 1) * g.h * g.w];
            im2col_row(plane, g, ky, kx, &mut dst[s * l..(s + 1) * l]);
        }
    }
}

/// The adjoint of [`im2col_cpu`]: scatter-add `cols (C k k, N OH OW)` into `(N, C, H, W)`.
pub(crate) fn col2im_cpu<T: Float>(cols: &[T], g: Geometry) -> Vec<T> {
    let l = g.oh() * g.ow();
    let ncols = g.cols();
    let mut out = vec![T::default(); g.n * g.c * g.h * g.w];
    out.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(nc, plane)| {
            let (n, c) = (nc / g.c, nc % g.c);
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let row = (c * g.k + ky) * g.k + kx;
                    let src = &cols[row * ncols + n * l..row * ncols + (n + 1) * l];
                    col2im_row(src, g, ky, kx, plane);
                }
            }
        });
    out
}

/// The adjoint of [`im2col_samples`]: add `cols (C k k, nn OH OW)` into `dx (nn, C, H, W)`, on
/// the calling thread.
pub(crate) fn col2im_samples<T: Float>(cols: &[T], g: Geometry, nn: usize, dx: &mut [T]) {
    let l = g.oh() * g.ow();
    let width = nn * l;
    for (p, plane) in dx[..nn * g.c * g.h * g.w].chunks_mut(g.h * g.w).enumerate() {
        let (s, c) = (p / g.c, p % g.c);
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = (c * g.k + ky) * g.k + kx;
                col2im_row(
                    &cols[row * width + s * l..row * width + (s + 1) * l],
                    g,
                    ky,
                    kx,
                    plane,
                );
            }
        }
    }
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::util::contiguous(s, l, "selfsup-ops im2col")
}

struct Im2Col(Geometry);
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "selfsup-im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.rows(), g.cols()));
        Ok(match s {
            CpuStorage::F32(v) => (CpuStorage::F32(im2col_cpu(slice(v, l)?, g)), shape),
            CpuStorage::F64(v) => (CpuStorage::F64(im2col_cpu(slice(v, l)?, g)), shape),
            _ => candle_core::bail!("im2col: f32 or f64 only"),
        })
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(col2im(grad, self.0)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "selfsup-col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.n, g.c, g.h, g.w));
        Ok(match s {
            CpuStorage::F32(v) => (CpuStorage::F32(col2im_cpu(slice(v, l)?, g)), shape),
            CpuStorage::F64(v) => (CpuStorage::F64(col2im_cpu(slice(v, l)?, g)), shape),
            _ => candle_core::bail!("col2im: f32 or f64 only"),
        })
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(im2col_g(grad, self.0)?))
    }
}

fn im2col_g(x: &Tensor, g: Geometry) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Im2Col(g))
}

/// `x (N, C, H, W)` to the column matrix `(C k k, N OH OW)` (CPU, f32/f64), differentiable.
pub fn im2col(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if k == 0 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!(
            "im2col: kernel {k} stride {stride} padding {pad} does not fit {:?}",
            x.dims()
        );
    }
    im2col_g(
        x,
        Geometry {
            n,
            c,
            h,
            w,
            k,
            stride,
            pad,
        },
    )
}

/// The adjoint of [`im2col`], differentiable.
pub fn col2im(cols: &Tensor, g: Geometry) -> Result<Tensor> {
    if cols.dims() != [g.rows(), g.cols()] {
        candle_core::bail!(
            "col2im: expected ({}, {}), got {:?}",
            g.rows(),
            g.cols(),
            cols.dims()
        );
    }
    cols.contiguous()?.apply_op1(Col2Im(g))
}

/// 2-D convolution, `x (N, C, H, W)`, `w (O, C, k, k)`, no bias. On the CPU in f32/f64 it is
/// one custom op (`im2col` + one matrix product, explicit backward; see the `conv` module);
/// elsewhere candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    conv2d_with(x, w, stride, pad, false)
}

/// [`conv2d`] whose forward takes Winograd F(2x2, 3x3) for 3x3 / stride 1 / padding 1
/// convolutions with at least 16 channels in and out (2.25x fewer multiplications; see the
/// `winograd` module), for inference: faster feature extraction, no gain in a training step.
/// The backward is [`conv2d`]'s.
pub fn conv2d_fast_forward(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    conv2d_with(x, w, stride, pad, true)
}

fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    winograd: bool,
) -> Result<Tensor> {
    let fast = matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64);
    let (_o, _c, k, k2) = w.dims4()?;
    if !fast || k != k2 {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    let g = conv_geometry(x, w, stride, pad)?;
    x.contiguous()?
        .apply_op2(&w.contiguous()?, crate::conv::Conv { g, winograd })
}

/// The geometry of `conv2d(x, w)` (square kernel), or an error when the shapes do not fit.
pub(crate) fn conv_geometry(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Geometry> {
    let (_o, c, k, k2) = w.dims4()?;
    let (n, cx, h, wd) = x.dims4()?;
    if cx != c || k != k2 {
        candle_core::bail!(
            "conv2d: input has {cx} channels, weight {:?} expects {c} (square kernels only)",
            w.dims()
        );
    }
    if k == 0 || stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!(
            "conv2d: kernel {k} stride {stride} padding {pad} does not fit {:?}",
            x.dims()
        );
    }
    Ok(Geometry {
        n,
        c,
        h,
        w: wd,
        k,
        stride,
        pad,
    })
}
