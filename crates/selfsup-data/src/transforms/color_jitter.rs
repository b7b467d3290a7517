//! Colour jitter (`RandomApply([ColorJitter(b, c, s, h)], p)`), torchvision `transforms.v2`
//! semantics on `uint8`:
//!
//! - brightness `f`: `out = trunc(clamp(x f, 0, 255))`
//! - contrast `f`: `m = mean(floor(L))` over the image, `out = trunc(clamp(f x + (1 - f) m))`
//! - saturation `f`: `out = trunc(clamp(f x + (1 - f) floor(L)))` per pixel
//! - hue `h`: to `[0, 1]` (`x / 255`), RGB -> HSV, `H = (H + h) mod 1`, HSV -> RGB,
//!   `out = trunc(255.999 y)`
//!
//! with `L = 0.2989 R + 0.587 G + 0.114 B`. Factors are drawn uniformly from
//! `[max(0, 1 - b), 1 + b]` (likewise `c`, `s`) and `[-h, h]`, and the four adjustments run in a
//! random order (a random permutation, as `torch.randperm(4)`).

use rand::seq::SliceRandom;

use super::grayscale::luma_f32;
use super::{coin, trunc_u8, uniform, Rng, Transform};
use crate::Image;

/// Multiply by `factor`.
pub fn adjust_brightness(mut img: Image, factor: f32) -> Image {
    let lut: [u8; 256] = std::array::from_fn(|v| trunc_u8(v as f32 * factor));
    img.data.iter_mut().for_each(|v| *v = lut[*v as usize]);
    img
}

/// Blend with the mean of the (floored) grayscale image.
pub fn adjust_contrast(mut img: Image, factor: f32) -> Image {
    let mean = if img.channels == 3 {
        let l = luma_f32(&img);
        l.iter().map(|v| v.floor() as f64).sum::<f64>() / l.len() as f64
    } else {
        img.data.iter().map(|&v| v as f64).sum::<f64>() / img.data.len() as f64
    } as f32;
    let add = (1.0 - factor) * mean;
    let lut: [u8; 256] = std::array::from_fn(|v| trunc_u8(v as f32 * factor + add));
    img.data.iter_mut().for_each(|v| *v = lut[*v as usize]);
    img
}

/// Blend each pixel with its own (floored) grey value.
pub fn adjust_saturation(mut img: Image, factor: f32) -> Image {
    if img.channels != 3 {
        return img;
    }
    let l = luma_f32(&img);
    let n = img.plane_len();
    let one_minus = 1.0 - factor;
    for c in 0..3 {
        for (v, &g) in img.data[c * n..(c + 1) * n].iter_mut().zip(&l) {
            *v = trunc_u8(*v as f32 * factor + one_minus * g.floor());
        }
    }
    img
}

/// Rotate the hue by `factor` (in turns, `-0.5..=0.5`).
pub fn adjust_hue(mut img: Image, factor: f32) -> Image {
    if img.channels != 3 {
        return img;
    }
    let n = img.plane_len();
    let (rp, rest) = img.data.split_at_mut(n);
    let (gp, bp) = rest.split_at_mut(n);
    for i in 0..n {
        let r = rp[i] as f32 / 255.0;
        let g = gp[i] as f32 / 255.0;
        let b = bp[i] as f32 / 255.0;
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let range = maxc - minc;
        let s = range / if eqc { 1.0 } else { maxc };
        let div = if eqc { 1.0 } else { range };
        let rc = (maxc - r) / div;
        let gc = (maxc - g) / div;
        let bc = (maxc - b) / div;
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = (h / 6.0 + 1.0) % 1.0;
        let h = (h + factor).rem_euclid(1.0);
        let v = maxc;
        // HSV -> RGB
        let h6 = h * 6.0;
        let fi = h6.floor();
        let f = h6 - fi;
        let sxv = s * v;
        let p = (v - sxv).clamp(0.0, 1.0);
        let q = (v - sxv * f).clamp(0.0, 1.0);
        let t = (sxv * f + p).clamp(0.0, 1.0);
        let (r2, g2, b2) = match (fi as i32).rem_euclid(6) {
            0 => (v, t, p),
            1 => (q, v, p),
            2 => (p, v, t),
            3 => (p, q, v),
            4 => (t, p, v),
            _ => (v, p, q),
        };
        const S: f32 = 255.0 + 1.0 - 1e-3;
        rp[i] = trunc_u8(r2 * S);
        gp[i] = trunc_u8(g2 * S);
        bp[i] = trunc_u8(b2 * S);
    }
    img
}

/// Random colour jitter, applied with probability `p`.
#[derive(Clone, Debug)]
pub struct ColorJitter {
    /// Brightness strength `b` (factor in `[max(0, 1 - b), 1 + b]`); 0 disables.
    pub brightness: f32,
    /// Contrast strength.
    pub contrast: f32,
    /// Saturation strength.
    pub saturation: f32,
    /// Hue strength (`0..=0.5`; shift in `[-h, h]`).
    pub hue: f32,
    /// Probability of applying the jitter at all.
    pub p: f64,
}

impl ColorJitter {
    /// Check the strengths are in range.
    pub fn validate(&self) -> crate::Result<()> {
        for (n, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(crate::Error::Config(format!("{n} must be >= 0, got {v}")));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(crate::Error::Config(format!(
                "hue must be in 0..=0.5, got {}",
                self.hue
            )));
        }
        Ok(())
    }
}

fn factor(rng: &mut Rng, s: f32) -> Option<f32> {
    (s > 0.0).then(|| uniform(rng, (1.0 - s as f64).max(0.0), 1.0 + s as f64) as f32)
}

impl Transform for ColorJitter {
    fn apply(&self, mut img: Image, rng: &mut Rng) -> Image {
        if !coin(rng, self.p) {
            return img;
        }
        let mut order = [0u8, 1, 2, 3];
        order.shuffle(rng);
        let b = factor(rng, self.brightness);
        let c = factor(rng, self.contrast);
        let s = factor(rng, self.saturation);
        let h = (self.hue > 0.0).then(|| uniform(rng, -self.hue as f64, self.hue as f64) as f32);
        for op in order {
            img = match (op, b, c, s, h) {
                (0, Some(f), ..) => adjust_brightness(img, f),
                (1, _, Some(f), ..) => adjust_contrast(img, f),
                (2, _, _, Some(f), _) => adjust_saturation(img, f),
                (3, _, _, _, Some(f)) => adjust_hue(img, f),
                _ => img,
            };
        }
        img
    }
}
