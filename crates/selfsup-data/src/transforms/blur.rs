//! Gaussian blur (`RandomApply([GaussianBlur(k, sigma=(lo, hi))], p)`).
//!
//! `sigma ~ U(lo, hi)`; kernel `w_i = exp(-(i - (k-1)/2)^2 / (2 sigma^2))`, normalised;
//! reflect padding of `k / 2` (edge pixel not repeated); applied separably; result rounded
//! half-to-even to `u8` as torchvision does for integer images.

use super::{coin, round_u8, uniform, Rng, Transform};
use crate::Image;

/// The normalised 1-D Gaussian kernel of odd length `k`.
pub fn gaussian_kernel1d(k: usize, sigma: f32) -> Vec<f32> {
    let c = (k as f32 - 1.0) / 2.0;
    let w: Vec<f32> = (0..k)
        .map(|i| {
            let d = (i as f32 - c) / sigma;
            (-0.5 * d * d).exp()
        })
        .collect();
    let s: f32 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

fn reflect(i: isize, n: isize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// Blur with a `k x k` Gaussian of standard deviation `sigma`.
pub fn gaussian_blur(img: Image, k: usize, sigma: f32) -> Image {
    assert!(k % 2 == 1, "blur kernel size must be odd, got {k}");
    let kern = gaussian_kernel1d(k, sigma);
    let r = (k / 2) as isize;
    let (c, h, w) = (img.channels, img.height, img.width);
    let mut tmp = vec![0f32; h * w];
    let mut out = vec![0u8; img.data.len()];
    let xi: Vec<Vec<usize>> = (0..w as isize)
        .map(|x| (-r..=r).map(|d| reflect(x + d, w as isize)).collect())
        .collect();
    for ch in 0..c {
        let src = img.plane(ch);
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            for x in 0..w {
                let mut acc = 0.0;
                for (kk, &sx) in kern.iter().zip(&xi[x]) {
                    acc += kk * row[sx] as f32;
                }
                tmp[y * w + x] = acc;
            }
        }
        let dst = &mut out[ch * h * w..(ch + 1) * h * w];
        let mut acc = vec![0f32; w];
        for y in 0..h as isize {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (kk, d) in kern.iter().zip(-r..=r) {
                let sy = reflect(y + d, h as isize);
                for (a, &v) in acc.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                    *a += kk * v;
                }
            }
            for (o, &a) in dst[y as usize * w..(y as usize + 1) * w]
                .iter_mut()
                .zip(&acc)
            {
                *o = round_u8(a);
            }
        }
    }
    Image::new(out, c, h, w)
}

/// Random Gaussian blur.
#[derive(Clone, Debug)]
pub struct GaussianBlur {
    /// Kernel size (odd).
    pub kernel_size: usize,
    /// Range of sigma (SimCLR: 0.1 to 2.0).
    pub sigma: (f32, f32),
    /// Probability.
    pub p: f64,
}

impl GaussianBlur {
    /// SimCLR's choice: kernel about 10% of the image side, made odd.
    pub fn simclr(image_size: usize, p: f64) -> Self {
        let k = ((image_size as f64 * 0.1) as usize) | 1;
        Self {
            kernel_size: k.max(3),
            sigma: (0.1, 2.0),
            p,
        }
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        if !coin(rng, self.p) {
            return img;
        }
        let s = uniform(rng, self.sigma.0 as f64, self.sigma.1 as f64) as f32;
        gaussian_blur(img, self.kernel_size, s)
    }
}
