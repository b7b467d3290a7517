//! Normalize (`ToDtype(float32, scale=True)` then `Normalize(mean, std)`):
//! `out = (x / 255 - mean[c]) / std[c]`, `u8` CHW in, `f32` CHW out.

use crate::Image;

/// Per-channel normalisation to `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Channel means (on the 0-1 scale).
    pub mean: [f32; 3],
    /// Channel standard deviations (on the 0-1 scale).
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10 statistics as used by lightly and solo-learn.
    pub fn cifar10() -> Self {
        Self {
            mean: [0.4914, 0.4822, 0.4465],
            std: [0.2470, 0.2435, 0.2616],
        }
    }

    /// ImageNet statistics.
    pub fn imagenet() -> Self {
        Self {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Write the normalised image into `out` (length `C * H * W`).
    pub fn apply_into(&self, img: &Image, out: &mut [f32]) {
        let n = img.plane_len();
        assert_eq!(out.len(), img.data.len());
        for c in 0..img.channels {
            let m = if img.channels == 1 { 0 } else { c };
            let scale = 1.0 / (255.0 * self.std[m]);
            let shift = -self.mean[m] / self.std[m];
            let lut: [f32; 256] = std::array::from_fn(|v| v as f32 * scale + shift);
            for (o, &v) in out[c * n..(c + 1) * n].iter_mut().zip(img.plane(c)) {
                *o = lut[v as usize];
            }
        }
    }

    /// Normalised image as a new vector.
    pub fn apply(&self, img: &Image) -> Vec<f32> {
        let mut out = vec![0.0; img.data.len()];
        self.apply_into(img, &mut out);
        out
    }
}
