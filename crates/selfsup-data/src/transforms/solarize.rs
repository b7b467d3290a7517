//! Solarize (`RandomSolarize(threshold, p)`): pixels `>= threshold` become `255 - x`.

use super::{coin, Rng, Transform};
use crate::Image;

/// Invert every pixel at or above `threshold`.
pub fn solarize(mut img: Image, threshold: u8) -> Image {
    for v in img.data.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
    img
}

/// Solarize with probability `p` (BYOL uses threshold 128, p 0 / 0.2 for its two views).
#[derive(Clone, Debug)]
pub struct Solarize {
    /// Threshold in grey levels.
    pub threshold: u8,
    /// Probability.
    pub p: f64,
}

impl Transform for Solarize {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        if coin(rng, self.p) {
            solarize(img, self.threshold)
        } else {
            img
        }
    }
}
