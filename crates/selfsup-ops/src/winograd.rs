//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): 16 multiplications per 2x2
//! output tile and channel pair instead of 36, so 2.25x fewer than the `im2col` product.
//!
//! Per chunk of samples (sized so that its buffers stay in cache): every 4x4 input tile (stride
//! 2, zero outside the image) becomes `V = B^T d B`, stored as 16 matrices `V[xi] (C, P)` over
//! the chunk's `P` tiles; 16 products `M[xi] (O, P) = U[xi] (O, C) x V[xi]` with the
//! transformed weights `U = G g G^T`; each output tile is `A^T m A`. Forward only: the
//! backward keeps the `im2col` kernels (the weight gradient is not a convolution of the same
//! shape). f32; the transforms' rounding stays within the 1e-5 of the convolution tests.
//!
//! Used for inference only ([`crate::conv2d_fast_forward`]): resnet18 feature extraction ran
//! at 158 against 107 images/s (batch 256) and 151 against 123 (batch 512), but a resnet18
//! training step gained nothing (35.3 and 34.2 against 35.8 and 36.1 views/s) and its peak RSS
//! grew from 3,252 to 3,640 MiB, so training keeps the `im2col` forward.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::conv::{dense, matmul};
use crate::im2col::Geometry;

/// Whether the Winograd kernel takes this convolution: 3x3, stride 1, padding 1 (output the
/// size of the input), enough channels for the transforms to be cheap next to the products.
pub(crate) fn applies(g: Geometry, o: usize) -> bool {
    g.k == 3 && g.stride == 1 && g.pad == 1 && g.c >= 16 && o >= 16
}

/// `U[xi][o][c] = (G g G^T)[xi]` for every filter `g = w[o][c]` (3x3).
fn transform_weights(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    for oc in 0..o * c {
        let g = &w[oc * 9..oc * 9 + 9];
        // t = G g (4x3), G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]].
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for (i, row) in t.iter().enumerate() {
            let (a, b, cc) = (row[0], row[1], row[2]);
            let v = [a, 0.5 * (a + b + cc), 0.5 * (a - b + cc), cc];
            for (l, &val) in v.iter().enumerate() {
                u[(i * 4 + l) * o * c + oc] = val;
            }
        }
    }
    u
}

/// The convolution of `x (N, C, H, W)` with `w (O, C, 3, 3)`, stride 1, padding 1:
/// `(N, O, H, W)`.
pub(crate) fn conv3x3_fwd(x: &[f32], w: &[f32], g: Geometry, o: usize) -> Vec<f32> {
    let (c, h, wd) = (g.c, g.h, g.w);
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let tiles = th * tw;
    // About 128 tiles per chunk (V and M of a chunk are 16 (C or O) x 128 floats): 64 and 128
    // ran at 165 and 167 images/s (resnet18 inference), 256 at 147, 1,024 at 119.
    let cs = 128usize.div_ceil(tiles).clamp(1, g.n.max(1));
    let u = transform_weights(w, o, c);
    let plane = h * wd;
    // Padded input rows: one zero column on the left, up to two on the right.
    let wpad = 2 * tw + 2;
    let mut y = vec![0f32; g.n * o * plane];
    y.par_chunks_mut(cs * o * plane).enumerate().for_each_init(
        || {
            (
                vec![0f32; 16 * c * cs * tiles],
                vec![0f32; 16 * o * cs * tiles],
                vec![0f32; 4 * wpad],
                vec![0f32; 16 * tw],
            )
        },
        |(v, m, rows, hbuf), (ci, ychunk)| {
            let nn = ychunk.len() / (o * plane);
            let p = nn * tiles;
            let n0 = ci * cs;
            // Input transform, a row of tiles at a time: the four input rows (zero-padded),
            // the horizontal transform of every tile in the row, then the vertical one,
            // written as 16 contiguous runs of `tw` columns.
            for s in 0..nn {
                for ch in 0..c {
                    let xp = &x[((n0 + s) * c + ch) * plane..((n0 + s) * c + ch + 1) * plane];
                    for ty in 0..th {
                        for (i, row) in rows.chunks_mut(wpad).enumerate() {
                            row.fill(0.0);
                            let iy = (2 * ty + i) as isize - 1;
                            if iy >= 0 && iy < h as isize {
                                let iy = iy as usize;
                                row[1..1 + wd].copy_from_slice(&xp[iy * wd..(iy + 1) * wd]);
                            }
                        }
                        for i in 0..4 {
                            let r = &rows[i * wpad..(i + 1) * wpad];
                            let hb = &mut hbuf[i * 4 * tw..(i + 1) * 4 * tw];
                            for tx in 0..tw {
                                let (r0, r1, r2, r3) =
                                    (r[2 * tx], r[2 * tx + 1], r[2 * tx + 2], r[2 * tx + 3]);
                                hb[tx] = r0 - r2;
                                hb[tw + tx] = r1 + r2;
                                hb[2 * tw + tx] = r2 - r1;
                                hb[3 * tw + tx] = r1 - r3;
                            }
                        }
                        let col0 = s * tiles + ty * tw;
                        for b in 0..4 {
                            let hv = |i: usize| &hbuf[(i * 4 + b) * tw..(i * 4 + b + 1) * tw];
                            let (h0, h1, h2, h3) = (hv(0), hv(1), hv(2), hv(3));
                            let off = |a: usize| ((a * 4 + b) * c + ch) * p + col0;
                            let (o0, o1, o2, o3) = (off(0), off(1), off(2), off(3));
                            for tx in 0..tw {
                                v[o0 + tx] = h0[tx] - h2[tx];
                            }
                            for tx in 0..tw {
                                v[o1 + tx] = h1[tx] + h2[tx];
                            }
                            for tx in 0..tw {
                                v[o2 + tx] = h2[tx] - h1[tx];
                            }
                            for tx in 0..tw {
                                v[o3 + tx] = h1[tx] - h3[tx];
                            }
                        }
                    }
                }
            }
            // 16 products M[xi] (O, p) = U[xi] (O, C) x V[xi] (C, p).
            for xi in 0..16 {
                // SAFETY: m holds 16 (O, p) blocks, u 16 (O, C), v 16 (C, p) (row stride p).
                unsafe {
                    matmul(
                        o,
                        p,
                        c,
                        m.as_mut_ptr().add(xi * o * p),
                        p,
                        false,
                        dense(u.as_ptr().add(xi * o * c), c),
                        dense(v.as_ptr().add(xi * c * p), p),
                        Parallelism::None,
                    )
                };
            }
            // Output transform, a row of tiles at a time: the vertical transform of the 16
            // runs of `tw` columns, then the horizontal one into two output rows.
            for s in 0..nn {
                for oc in 0..o {
                    let yp = &mut ychunk[(s * o + oc) * plane..(s * o + oc + 1) * plane];
                    for ty in 0..th {
                        let col0 = s * tiles + ty * tw;
                        let mv =
                            |xi: usize| &m[(xi * o + oc) * p + col0..(xi * o + oc) * p + col0 + tw];
                        for b in 0..4 {
                            let (m0, m1, m2, m3) = (mv(b), mv(4 + b), mv(8 + b), mv(12 + b));
                            let (t0, t1) = hbuf[..8 * tw].split_at_mut(4 * tw);
                            for tx in 0..tw {
                                t0[b * tw + tx] = m0[tx] + m1[tx] + m2[tx];
                                t1[b * tw + tx] = m1[tx] - m2[tx] - m3[tx];
                            }
                        }
                        for (i, t) in hbuf[..8 * tw].chunks(4 * tw).enumerate() {
                            let oy = 2 * ty + i;
                            if oy >= h {
                                continue;
                            }
                            let yr = &mut yp[oy * wd..(oy + 1) * wd];
                            let (a0, a1) = (&t[..tw], &t[tw..2 * tw]);
                            let (a2, a3) = (&t[2 * tw..3 * tw], &t[3 * tw..]);
                            for tx in 0..wd / 2 {
                                yr[2 * tx] = a0[tx] + a1[tx] + a2[tx];
                                yr[2 * tx + 1] = a1[tx] - a2[tx] - a3[tx];
                            }
                            if wd % 2 == 1 {
                                let tx = tw - 1;
                                yr[2 * tx] = a0[tx] + a1[tx] + a2[tx];
                            }
                        }
                    }
                }
            }
        },
    );
    y
}
