//! Patch-whitening initialisation of a first convolution.
//!
//! The first layer of an image encoder starts from random filters and spends its first steps
//! finding the directions in which small patches of natural images vary. Patch whitening
//! (Keller Jordan's airbench, after Page's fast CIFAR-10 ResNet) starts it from them: the
//! eigenvectors of the `k x k x C` patches' second-moment matrix, each scaled by
//! `1 / sqrt(eigenvalue + eps)`, so that the layer's outputs are decorrelated with unit second
//! moment on the training images, and each filter's negative beside it, so that a ReLU after
//! the layer keeps both signs of every component. With more eigenvector pairs than output
//! channels allow, the directions of largest variance are kept.
//!
//! The eigendecomposition is `nalgebra`'s symmetric eigensolver: the matrix is small
//! (`C k^2` square: 27 x 27 for a 3x3 RGB layer).

use crate::{Error, Result};

/// The uncentred second-moment matrix `(d, d)`, `d = c k^2`, row-major, of every `k x k` patch
/// (stride 1, inside the image) of `n` images stored as `(n, c, h, w)` in `pixels`. A patch's
/// vector is ordered like a convolution weight's `(c, k, k)`.
pub fn patch_second_moment(
    pixels: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
) -> Result<Vec<f64>> {
    if pixels.len() != n * c * h * w || k == 0 || k > h || k > w || n == 0 {
        return Err(Error::Config(format!(
            "patch whitening needs images of at least {k} x {k} pixels: got {n} images of {c} x {h} x {w} ({} values)",
            pixels.len()
        )));
    }
    let d = c * k * k;
    let mut m = vec![0f64; d * d];
    let mut v = vec![0f64; d];
    let mut count = 0usize;
    for img in pixels.chunks_exact(c * h * w) {
        for y in 0..=h - k {
            for x in 0..=w - k {
                let mut j = 0;
                for ch in 0..c {
                    for dy in 0..k {
                        let row = &img[ch * h * w + (y + dy) * w + x..][..k];
                        for &p in row {
                            v[j] = p as f64;
                            j += 1;
                        }
                    }
                }
                // The upper triangle; mirrored below.
                for a in 0..d {
                    let va = v[a];
                    let ra = &mut m[a * d..(a + 1) * d];
                    for b in a..d {
                        ra[b] += va * v[b];
                    }
                }
                count += 1;
            }
        }
    }
    for a in 0..d {
        for b in a..d {
            let s = m[a * d + b] / count as f64;
            m[a * d + b] = s;
            m[b * d + a] = s;
        }
    }
    Ok(m)
}

/// Whitening filters from a second-moment matrix `moment` `(d, d)`: `2 * pairs` rows of `d`
/// values, the eigenvectors of the `pairs` largest eigenvalues `l` (largest first), each
/// divided by `sqrt(l + eps)`, then the same rows negated. Each eigenvector's sign is fixed
/// (its largest-magnitude value positive), so the result does not depend on the solver's
/// choice.
pub fn whitening_filters(moment: &[f64], d: usize, pairs: usize, eps: f64) -> Result<Vec<f32>> {
    if moment.len() != d * d || pairs == 0 || pairs > d {
        return Err(Error::Config(format!(
            "whitening filters: {pairs} pairs from a {d} x {d} matrix ({} values)",
            moment.len()
        )));
    }
    if moment.iter().any(|x| !x.is_finite()) {
        return Err(Error::Config(
            "whitening filters: the patches' second moments are not finite".into(),
        ));
    }
    let m = nalgebra::DMatrix::from_row_slice(d, d, moment);
    let eig = nalgebra::SymmetricEigen::new(m);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let mut rows = Vec::with_capacity(2 * pairs * d);
    for &i in &order[..pairs] {
        let l = eig.eigenvalues[i].max(0.0);
        let col = eig.eigenvectors.column(i);
        let big = col
            .iter()
            .copied()
            .fold(0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        let scale = sign / (l + eps).sqrt();
        rows.extend(col.iter().map(|&x| (x * scale) as f32));
    }
    let neg: Vec<f32> = rows.iter().map(|x| -x).collect();
    rows.extend(neg);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic correlated "images": a smooth field plus a little noise per channel.
    fn images(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let mut out = Vec::with_capacity(n * c * h * w);
        for _ in 0..n {
            let (a, b) = (rnd(), rnd());
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let smooth = a * (x as f32 * 0.4).sin() + b * (y as f32 * 0.3).cos();
                        out.push(smooth * (1.0 + ch as f32 * 0.2) + 0.3 * rnd());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_second_moment_is_that_of_the_patches() {
        // One 1-channel 3x3 image, 2x2 patches: four patches, by hand.
        let px = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let m = patch_second_moment(&px, (1, 1, 3, 3), 2).unwrap();
        let patches = [
            [1.0, 2.0, 4.0, 5.0],
            [2.0, 3.0, 5.0, 6.0],
            [4.0, 5.0, 7.0, 8.0],
            [5.0, 6.0, 8.0, 9.0],
        ];
        for a in 0..4 {
            for b in 0..4 {
                let want: f64 = patches.iter().map(|p| p[a] * p[b]).sum::<f64>() / 4.0;
                assert!((m[a * 4 + b] - want).abs() < 1e-12, "{a} {b}");
            }
        }
        assert!(patch_second_moment(&px, (1, 1, 3, 3), 4).is_err());
        assert!(patch_second_moment(&px[..8], (1, 1, 3, 3), 2).is_err());
    }

    /// The filters whiten the patches they came from: `W M W^T` is diagonal with entries
    /// `l / (l + eps)`, largest eigenvalue first, and the second half is the first negated.
    #[test]
    fn the_filters_whiten_the_patches() {
        let (c, k) = (3, 3);
        let d = c * k * k;
        let px = images(20, c, 10, 10);
        let m = patch_second_moment(&px, (20, c, 10, 10), k).unwrap();
        let eps = 1e-3;
        let pairs = 16;
        let f = whitening_filters(&m, d, pairs, eps).unwrap();
        assert_eq!(f.len(), 2 * pairs * d);
        let row = |i: usize| &f[i * d..(i + 1) * d];
        let mut prev = f64::INFINITY;
        for i in 0..pairs {
            for j in 0..pairs {
                // (W M W^T)_ij
                let mut s = 0f64;
                for a in 0..d {
                    for b in 0..d {
                        s += row(i)[a] as f64 * m[a * d + b] * row(j)[b] as f64;
                    }
                }
                if i == j {
                    // l / (l + eps), with l recovered from the row's norm: |w|^2 = 1 / (l + eps).
                    let n2: f64 = row(i).iter().map(|&x| (x as f64).powi(2)).sum();
                    let l = 1.0 / n2 - eps;
                    assert!((s - l / (l + eps)).abs() < 1e-4, "{i}: {s} {l}");
                    assert!(l <= prev * (1.0 + 1e-9), "eigenvalues not decreasing");
                    prev = l;
                } else {
                    assert!(s.abs() < 1e-4, "{i} {j}: {s}");
                }
            }
            assert!(row(i).iter().zip(row(i + pairs)).all(|(a, b)| *a == -*b));
        }
        assert!(whitening_filters(&m, d, d + 1, eps).is_err());
        assert!(whitening_filters(&m[1..], d, 4, eps).is_err());
        let mut nan = m.clone();
        nan[3] = f64::NAN;
        assert!(whitening_filters(&nan, d, 4, eps).is_err());
    }
}
