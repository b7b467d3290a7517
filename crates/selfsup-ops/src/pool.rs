//! Max pooling with an explicit backward, any window, stride and padding.
//!
//! Forward: per `(n, c)` plane (parallel), the maximum over each window, padding counting as
//! negative infinity. Backward: the gradient of each output goes to the **first** position in
//! its window (row-major) that holds the maximum, as PyTorch's indices do; the position is
//! found again from the saved input and output instead of a separate index tensor.
//!
//! candle 0.11's max-pool backward is eight full-size ops (upsample, compare, average pool,
//! divide, ...) and exists only for `kernel == stride` without padding.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Window geometry of a square max pool over `(N, C, H, W)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pool {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
}

impl Pool {
    pub(crate) fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub(crate) fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// The in-bounds rows (or columns) `[lo, hi)` of output row `o` along a side of `len`.
    fn span(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.pad as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.k as isize).max(0) as usize).min(len);
        (lo, hi)
    }
    /// `(position, value)` of the first maximum of output `(oy, ox)` in `plane`.
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> (usize, f32) {
        let (y0, y1) = self.span(oy, self.h);
        let (x0, x1) = self.span(ox, self.w);
        let mut best = (usize::MAX, f32::NEG_INFINITY);
        for iy in y0..y1 {
            for ix in x0..x1 {
                let v = plane[iy * self.w + ix];
                // `>` keeps the first of equal maxima; a NaN wins, as in PyTorch.
                if v > best.1 || best.0 == usize::MAX || v.is_nan() && !best.1.is_nan() {
                    best = (iy * self.w + ix, v);
                }
            }
        }
        best
    }
}

/// Max pooling of the `(h, w)` planes of `x`, planes in parallel.
pub(crate) fn pool_fwd(x: &[f32], p: Pool) -> Vec<f32> {
    let (oh, ow) = (p.oh(), p.ow());
    // Every output of every plane is written below.
    let mut y = crate::util::output_buffer(x.len() / (p.h * p.w) * oh * ow);
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(p.h * p.w))
        .for_each(|(out, plane)| pool_fwd_plane(out, plane, p, false));
    y
}

/// Max pooling of one `(h, w)` plane into its `oh x ow` outputs (every one written). `finite`:
/// the caller knows that `plane` holds no NaN (a rectified plane: `max(NaN, 0)` is 0), which
/// skips the search for one.
pub(crate) fn pool_fwd_plane(out: &mut [f32], plane: &[f32], p: Pool, finite: bool) {
    let (oh, ow) = (p.oh(), p.ow());
    if p.k == 2 && p.stride == 2 && p.pad == 0 {
        // The common case, without the general window bookkeeping.
        for oy in 0..oh {
            let r0 = &plane[2 * oy * p.w..];
            let r1 = &plane[(2 * oy + 1) * p.w..];
            for ox in 0..ow {
                let (a, b) = (r0[2 * ox], r0[2 * ox + 1]);
                let (cc, d) = (r1[2 * ox], r1[2 * ox + 1]);
                out[oy * ow + ox] = a.max(b).max(cc.max(d));
            }
        }
        if !finite && plane.iter().any(|v| v.is_nan()) {
            for oy in 0..oh {
                for ox in 0..ow {
                    out[oy * ow + ox] = p.argmax(plane, oy, ox).1;
                }
            }
        }
    } else {
        for oy in 0..oh {
            for ox in 0..ow {
                out[oy * ow + ox] = p.argmax(plane, oy, ox).1;
            }
        }
    }
}

/// 2x2 stride-2 windows of a plane (`w` wide, `oh x ow` windows, no NaN): each output's
/// gradient added at the first maximum of its four inputs in row-major order, as `argmax`
/// finds it (`>` keeps the first of equal maxima). Branch-free: on random data a compare
/// and branch per candidate mispredicts half the time.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn pool2_bwd_plane(d: &mut [f32], plane: &[f32], g: &[f32], w: usize, oh: usize, ow: usize) {
    for oy in 0..oh {
        let (r0, r1) = (2 * oy * w, (2 * oy + 1) * w);
        for ox in 0..ow {
            let (i0, i1) = (r0 + 2 * ox, r1 + 2 * ox);
            let (mut best, mut m) = (i0, plane[i0]);
            for j in [i0 + 1, i1, i1 + 1] {
                let v = plane[j];
                let t = v > m;
                best = if t { j } else { best };
                m = if t { v } else { m };
            }
            d[best] += g[oy * ow + ox];
        }
    }
}

/// The gradient of each output added into `dx` at its window's first maximum in `x`.
pub(crate) fn pool_bwd_into(x: &[f32], dy: &[f32], p: Pool, dx: &mut [f32]) {
    let (oh, ow) = (p.oh(), p.ow());
    dx.par_chunks_mut(p.h * p.w)
        .zip(x.par_chunks(p.h * p.w))
        .zip(dy.par_chunks(oh * ow))
        .for_each(|((d, plane), g)| pool_bwd_plane(d, plane, g, p, false));
}

/// The gradient `g` of one plane's outputs added into `d` at each window's first maximum in
/// `plane`; `finite` as in [`pool_fwd_plane`].
pub(crate) fn pool_bwd_plane(d: &mut [f32], plane: &[f32], g: &[f32], p: Pool, finite: bool) {
    let (oh, ow) = (p.oh(), p.ow());
    if p.k == 2 && p.stride == 2 && p.pad == 0 && (finite || !plane.iter().any(|v| v.is_nan())) {
        // The common case, without the window bookkeeping; with a NaN in the plane the
        // general path decides.
        pool2_bwd_plane(d, plane, g, p.w, oh, ow);
        return;
    }
    for oy in 0..oh {
        for ox in 0..ow {
            let (i, _) = p.argmax(plane, oy, ox);
            if i != usize::MAX {
                d[i] += g[oy * ow + ox];
            }
        }
    }
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::util::f32s(s, l, "max pool")
}

struct MaxPool(Pool);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "selfsup-max-pool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let (n, c) = (l.dims()[0], l.dims()[1]);
        let x = f32s(s, l)?;
        let (oh, ow) = (p.oh(), p.ow());
        let y = pool_fwd(x, p);
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &MaxPoolGrad(self.0),
        )?))
    }
}

struct MaxPoolGrad(Pool);

impl candle_core::CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "selfsup-max-pool2d-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let x = f32s(s1, l1)?;
        let dy = f32s(s2, l2)?;
        let mut dx = vec![0f32; x.len()];
        pool_bwd_into(x, dy, p, &mut dx);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Max pooling of `x (N, C, H, W)` (f32, CPU) with a `k x k` window, `stride` and `pad`
/// (negative-infinity padding, `pad <= k / 2` as in PyTorch), differentiable; see the module
/// docs for ties.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if k == 0 || stride == 0 || 2 * pad > k || h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!(
            "max pool: kernel {k} stride {stride} padding {pad} does not fit {:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(MaxPool(Pool {
        h,
        w,
        k,
        stride,
        pad,
    }))
}
