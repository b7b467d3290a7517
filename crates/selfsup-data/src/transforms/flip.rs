//! Horizontal flip (`RandomHorizontalFlip(p)`): `out[c, y, x] = in[c, y, W - 1 - x]`.

use super::{coin, Rng, Transform};
use crate::Image;

/// Mirror left-right.
pub fn hflip(mut img: Image) -> Image {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w) {
        row.reverse();
    }
    img
}

/// Flip with probability `p` (0.5 in every SimCLR recipe).
#[derive(Clone, Debug)]
pub struct HorizontalFlip {
    /// Probability of flipping.
    pub p: f64,
}

impl Default for HorizontalFlip {
    fn default() -> Self {
        Self { p: 0.5 }
    }
}

impl Transform for HorizontalFlip {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        if coin(rng, self.p) {
            hflip(img)
        } else {
            img
        }
    }
}
