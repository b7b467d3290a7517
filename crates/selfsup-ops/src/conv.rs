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

use crate::im2col::{col2im_cpu, im2col_cpu, Float, Geometry};

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

/// A row-major `(rows, cols)` operand with arbitrary strides.
#[derive(Clone, Copy)]
struct Mat<T> {
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
unsafe fn matmul<T: Float>(
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

fn conv_fwd<T: Float>(x: &[T], w: &[T], g: Geometry, o: usize) -> Vec<T> {
    let (rows, ncols, l) = (g.rows(), g.cols(), g.oh() * g.ow());
    let cols = im2col_cpu(x, g);
    let mut tmp = vec![T::default(); o * ncols];
    // SAFETY: tmp is (o, ncols), w is (o, rows), cols is (rows, ncols), all row-major.
    unsafe {
        matmul(
            o,
            ncols,
            rows,
            tmp.as_mut_ptr(),
            ncols,
            false,
            Mat {
                ptr: w.as_ptr(),
                rs: rows as isize,
                cs: 1,
            },
            Mat {
                ptr: cols.as_ptr(),
                rs: ncols as isize,
                cs: 1,
            },
            parallelism(),
        )
    };
    drop(cols);
    let mut y = vec![T::default(); g.n * o * l];
    y.par_chunks_mut(o * l).enumerate().for_each(|(n, yn)| {
        for (oc, dst) in yn.chunks_mut(l).enumerate() {
            dst.copy_from_slice(&tmp[oc * ncols + n * l..oc * ncols + (n + 1) * l]);
        }
    });
    y
}

/// `(dx, dw)`: `dx` empty when not wanted.
fn conv_bwd<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    g: Geometry,
    o: usize,
    need_dx: bool,
) -> (Vec<T>, Vec<T>) {
    let (rows, ncols, l) = (g.rows(), g.cols(), g.oh() * g.ow());
    // dY (N, O, L) -> dyt (O, N L).
    let mut dyt = vec![T::default(); o * ncols];
    dyt.par_chunks_mut(ncols).enumerate().for_each(|(oc, dst)| {
        for n in 0..g.n {
            dst[n * l..(n + 1) * l].copy_from_slice(&dy[(n * o + oc) * l..(n * o + oc + 1) * l]);
        }
    });
    let mut cols = im2col_cpu(x, g);
    // dW (O, rows) = dyt (O, NL) x cols^T (NL, rows), the NL axis split into one chunk per thread
    // (each a single-threaded product), then summed.
    let threads = rayon::current_num_threads().max(1);
    let chunk = ncols.div_ceil(threads).max(1);
    let partials: Vec<Vec<T>> = (0..ncols.div_ceil(chunk))
        .into_par_iter()
        .map(|i| {
            let (a, b) = (i * chunk, ((i + 1) * chunk).min(ncols));
            let mut part = vec![T::default(); o * rows];
            // SAFETY: column window [a, b) of dyt (O, NL) and row window [a, b) of cols^T.
            unsafe {
                matmul(
                    o,
                    rows,
                    b - a,
                    part.as_mut_ptr(),
                    rows,
                    false,
                    Mat {
                        ptr: dyt.as_ptr().add(a),
                        rs: ncols as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: cols.as_ptr().add(a),
                        rs: 1,
                        cs: ncols as isize,
                    },
                    Parallelism::None,
                )
            };
            part
        })
        .collect();
    let mut dw = vec![T::default(); o * rows];
    for p in &partials {
        for (d, &v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
    if !need_dx {
        return (Vec::new(), dw);
    }
    // dcols (rows, NL) = W^T (rows, O) x dyt (O, NL), written over cols.
    // SAFETY: W (O, rows) read transposed; cols is (rows, NL).
    unsafe {
        matmul(
            rows,
            ncols,
            o,
            cols.as_mut_ptr(),
            ncols,
            false,
            Mat {
                ptr: w.as_ptr(),
                rs: 1,
                cs: rows as isize,
            },
            Mat {
                ptr: dyt.as_ptr(),
                rs: ncols as isize,
                cs: 1,
            },
            parallelism(),
        )
    };
    drop(dyt);
    (col2im_cpu(&cols, g), dw)
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("selfsup-ops conv2d: inputs must be contiguous"),
    }
}

pub(crate) struct Conv(pub Geometry);

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
        let g = self.0;
        let o = l2.dims()[0];
        let shape = Shape::from((g.n, o, g.oh(), g.ow()));
        Ok(match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (
                CpuStorage::F32(conv_fwd(contiguous(x, l1)?, contiguous(w, l2)?, g, o)),
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
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &ConvGrad { g: self.0, need_dx })?;
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
        let (mut dx, dw) = conv_bwd(x, w, dy, self.g, o, self.need_dx);
        dx.extend_from_slice(&dw);
        dx
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
