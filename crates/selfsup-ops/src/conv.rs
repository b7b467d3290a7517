//! The convolution as **one** custom op with an explicit backward.
//!
//! Forward: `im2col` into a scratch matrix `cols (C k k, N L)`, one matrix product
//! `W (O, C k k) x cols` over the whole batch (the `gemm` crate, all threads), then a parallel
//! transposition of `(O, N L)` into the `(N, O, L)` output.
//!
//! Backward (one more op, no graph of its own): `dY` transposed to `(O, N L)`; `cols`
//! recomputed (cheaper than keeping `C k k` copies of every input alive until backward, and the
//! reason a step's peak memory stays low); `dW = dY cols^T`, split over the long `N L` axis so
//! that both cores work even when `O x C k k` is small; `dcols = W^T dY` and `col2im` only when
//! the input needs a gradient (never for the image batch itself).
//!
//! Composed of candle ops instead, the same convolution kept the column matrix, a transposed
//! copy and their gradients alive and paid candle's zero-fill-and-add gradient accumulation for
//! each of them.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::im2col::{col2im_samples, im2col_samples, Float, Geometry};

/// A row-major `(rows, cols)` operand with arbitrary strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

/// `dst (m, n), row stride ld = lhs (m, k) x rhs (k, n)`, overwriting (or adding to) `dst`.
///
/// # Safety
/// `dst`, `lhs` and `rhs` must address `m x n`, `m x k` and `k x n` elements with the given
/// strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    ld: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ld as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

/// Independent partial sums of the weight gradient (the parallelism of the weight-gradient
/// pass; fixed so that the thread count never changes the result).
const DW_GROUPS: usize = 8;

/// Samples per chunk: enough output columns (`chunk x L >= 256`) for an efficient product,
/// and a column matrix of a chunk small enough (a few hundred KiB) to stay in a core's cache
/// between `im2col` and the product that reads it.
fn chunk_samples(g: Geometry) -> usize {
    let l = g.oh() * g.ow();
    256usize.div_ceil(l).clamp(1, g.n.max(1))
}

/// `(O, nn L)` (row stride `nn L`) to `(nn, O, L)`.
fn to_nchw<T: Float>(src: &[T], o: usize, nn: usize, l: usize, dst: &mut [T]) {
    for s in 0..nn {
        for oc in 0..o {
            let w = nn * l;
            dst[(s * o + oc) * l..(s * o + oc + 1) * l]
                .copy_from_slice(&src[oc * w + s * l..oc * w + (s + 1) * l]);
        }
    }
}

/// `(nn, O, L)` to `(O, nn L)`.
fn from_nchw<T: Float>(src: &[T], o: usize, nn: usize, l: usize, dst: &mut [T]) {
    for s in 0..nn {
        for oc in 0..o {
            let w = nn * l;
            dst[oc * w + s * l..oc * w + (s + 1) * l]
                .copy_from_slice(&src[(s * o + oc) * l..(s * o + oc + 1) * l]);
        }
    }
}

/// Row-major `(rows, cols)` matrix at `p`.
pub(crate) fn dense<T>(p: *const T, cols: usize) -> Mat<T> {
    Mat {
        ptr: p,
        rs: cols as isize,
        cs: 1,
    }
}

/// The transpose of a row-major `(rows, cols)` matrix at `p`, as a `(cols, rows)` operand.
fn transposed<T>(p: *const T, cols: usize) -> Mat<T> {
    Mat {
        ptr: p,
        rs: 1,
        cs: cols as isize,
    }
}

pub(crate) fn conv_fwd<T: Float>(x: &[T], w: &[T], g: Geometry, o: usize) -> Vec<T> {
    let (rows, l) = (g.rows(), g.oh() * g.ow());
    let cs = chunk_samples(g);
    let mut y = vec![T::default(); g.n * o * l];
    // Chunks of samples in parallel, each im2col + a single-threaded product on its own core.
    y.par_chunks_mut(cs * o * l).enumerate().for_each_init(
        || {
            (
                vec![T::default(); rows * cs * l],
                vec![T::default(); o * cs * l],
            )
        },
        |(cols, tmp), (ci, ychunk)| {
            let nn = ychunk.len() / (o * l);
            let width = nn * l;
            im2col_samples(x, g, ci * cs, nn, cols);
            // One sample: the product lands in place; several: through (O, nn L).
            let dst = if nn == 1 {
                ychunk.as_mut_ptr()
            } else {
                tmp.as_mut_ptr()
            };
            // SAFETY: dst holds (O, width); w is (O, rows); cols holds (rows, width).
            unsafe {
                matmul(
                    o,
                    width,
                    rows,
                    dst,
                    width,
                    false,
                    dense(w.as_ptr(), rows),
                    dense(cols.as_ptr(), width),
                    Parallelism::None,
                )
            };
            if nn > 1 {
                to_nchw(tmp, o, nn, l, ychunk);
            }
        },
    );
    y
}

/// Raw pointer to the input gradient; each chunk writes only its own samples.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// `dx` then `dw` in one buffer (`dx` left out when not wanted), allocated once at its final
/// size: growing a `dx`-sized vector by `dw` would reallocate and copy it, holding up to three
/// input-sized buffers at once.
fn conv_bwd<T: Float>(x: &[T], w: &[T], dy: &[T], g: Geometry, o: usize, need_dx: bool) -> Vec<T> {
    let nx = if need_dx { g.n * g.c * g.h * g.w } else { 0 };
    let mut out = vec![T::default(); nx + o * g.rows()];
    let (dx, dw) = out.split_at_mut(nx);
    conv_bwd_into(x, w, dy, g, o, need_dx.then_some(dx), dw);
    out
}

/// The convolution's backward: `dx` (`(N, C, H, W)`, when given; must be zero, the columns
/// are added into it) and `dw` (`(O, C k k)`, overwritten).
pub(crate) fn conv_bwd_into<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    g: Geometry,
    o: usize,
    dx: Option<&mut [T]>,
    dw: &mut [T],
) {
    let (rows, l) = (g.rows(), g.oh() * g.ow());
    let plane = g.c * g.h * g.w;
    let cs = chunk_samples(g);
    let chunks = g.n.div_ceil(cs);
    let need_dx = dx.is_some();
    let dxp = Shared(dx.map_or(std::ptr::null_mut(), |d| d.as_mut_ptr()));
    // A fixed number of groups of consecutive chunks, whatever the thread count: each group
    // sums its own dW over its chunks in order, and the groups' sums are added in group order,
    // so the result is the same bits for 1, 2 or 64 threads (a per-thread split made dW depend
    // on the thread count).
    let groups = DW_GROUPS.clamp(1, chunks.max(1));
    let per = chunks.div_ceil(groups);
    let partials: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map_init(
            // Scratch per worker thread, reused by the groups it runs (fully overwritten).
            || {
                (
                    vec![T::default(); rows * cs * l],
                    vec![T::default(); o * cs * l],
                )
            },
            |(cols, dyt), t| {
                let mut dw = vec![T::default(); o * rows];
                for ci in t * per..((t + 1) * per).min(chunks) {
                    let n0 = ci * cs;
                    let nn = cs.min(g.n - n0);
                    let width = nn * l;
                    let dyc = &dy[n0 * o * l..(n0 + nn) * o * l];
                    // dY of the chunk as (O, width): in place for one sample.
                    let dyp = if nn == 1 {
                        dyc.as_ptr()
                    } else {
                        from_nchw(dyc, o, nn, l, dyt);
                        dyt.as_ptr()
                    };
                    im2col_samples(x, g, n0, nn, cols);
                    // SAFETY: dw is (O, rows); dY chunk (O, width); cols (rows, width) read
                    // transposed.
                    unsafe {
                        matmul(
                            o,
                            rows,
                            width,
                            dw.as_mut_ptr(),
                            rows,
                            true,
                            dense(dyp, width),
                            transposed(cols.as_ptr(), width),
                            Parallelism::None,
                        )
                    };
                    if need_dx {
                        // dcols (rows, width) = W^T (rows, O) x dY (O, width), over cols.
                        // SAFETY: as above; W (O, rows) read transposed.
                        unsafe {
                            matmul(
                                rows,
                                width,
                                o,
                                cols.as_mut_ptr(),
                                width,
                                false,
                                transposed(w.as_ptr(), rows),
                                dense(dyp, width),
                                Parallelism::None,
                            )
                        };
                        // SAFETY: samples n0 .. n0 + nn of dx belong to this chunk alone.
                        let dxc = unsafe {
                            std::slice::from_raw_parts_mut(dxp.get().add(n0 * plane), nn * plane)
                        };
                        col2im_samples(cols, g, nn, dxc);
                    }
                }
                dw
            },
        )
        .collect();
    dw.fill(T::default());
    for p in &partials {
        for (d, &v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::util::contiguous(s, l, "selfsup-ops conv2d")
}

/// The convolution op; `winograd`: take the Winograd forward where it applies.
pub(crate) struct Conv {
    pub(crate) g: Geometry,
    pub(crate) winograd: bool,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "selfsup-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let o = l2.dims()[0];
        let shape = Shape::from((g.n, o, g.oh(), g.ow()));
        Ok(match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (
                CpuStorage::F32(if self.winograd && crate::winograd::applies(g, o) {
                    crate::winograd::conv3x3_fwd(contiguous(x, l1)?, contiguous(w, l2)?, g, o)
                } else {
                    conv_fwd(contiguous(x, l1)?, contiguous(w, l2)?, g, o)
                }),
                shape,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => (
                CpuStorage::F64(conv_fwd(contiguous(x, l1)?, contiguous(w, l2)?, g, o)),
                shape,
            ),
            _ => candle_core::bail!("selfsup-ops conv2d: f32 or f64 inputs of one dtype"),
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // An input that is neither a variable nor computed from one (the image batch) needs no
        // gradient: skip the largest product and col2im.
        let need_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &ConvGrad { g: self.g, need_dx })?;
        let nx = if need_dx { x.elem_count() } else { 0 };
        let dw = packed.narrow(0, nx, w.elem_count())?.reshape(w.shape())?;
        let dx = if need_dx {
            Some(packed.narrow(0, 0, nx)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

struct ConvGrad {
    g: Geometry,
    need_dx: bool,
}

impl ConvGrad {
    fn run<T: Float>(&self, x: &[T], w: &[T], dy: &[T], o: usize) -> Vec<T> {
        conv_bwd(x, w, dy, self.g, o, self.need_dx)
    }
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "selfsup-conv2d-grad"
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
        let o = l2.dims()[0];
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
                CpuStorage::F32(self.run(
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    contiguous(dy, l3)?,
                    o,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => {
                CpuStorage::F64(self.run(
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    contiguous(dy, l3)?,
                    o,
                ))
            }
            _ => candle_core::bail!("selfsup-ops conv2d grad: f32 or f64 inputs of one dtype"),
        };
        let len = match &out {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            _ => unreachable!("built above"),
        };
        Ok((out, Shape::from(len)))
    }
}
