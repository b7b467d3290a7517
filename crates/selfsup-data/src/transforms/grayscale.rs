//! Grayscale (`RandomGrayscale(p)`): `L = 0.2989 R + 0.587 G + 0.114 B`, truncated to `u8`
//! as torchvision does for `uint8`, repeated on all three channels.

use super::{coin, trunc_u8, Rng, Transform};
use crate::Image;

/// Luma of each pixel as `f32` (not rounded), one plane.
pub(crate) fn luma_f32(img: &Image) -> Vec<f32> {
    let (r, g, b) = (img.plane(0), img.plane(1), img.plane(2));
    r.iter()
        .zip(g)
        .zip(b)
        .map(|((&r, &g), &b)| r as f32 * 0.2989 + g as f32 * 0.587 + b as f32 * 0.114)
        .collect()
}

/// Convert to grayscale, keeping 3 channels.
pub fn rgb_to_grayscale(img: Image) -> Image {
    if img.channels == 1 {
        return img;
    }
    let l: Vec<u8> = luma_f32(&img).into_iter().map(trunc_u8).collect();
    let mut data = Vec::with_capacity(3 * l.len());
    for _ in 0..3 {
        data.extend_from_slice(&l);
    }
    Image::new(data, 3, img.height, img.width)
}

/// Grayscale with probability `p` (0.2 in SimCLR).
#[derive(Clone, Debug)]
pub struct RandomGrayscale {
    /// Probability.
    pub p: f64,
}

impl Transform for RandomGrayscale {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        if coin(rng, self.p) {
            rgb_to_grayscale(img)
        } else {
            img
        }
    }
}
