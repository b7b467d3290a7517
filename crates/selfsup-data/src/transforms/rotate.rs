//! Rotation by multiples of 90 degrees, counter-clockwise, as `torch.rot90(img, k, dims=(-2, -1))`.
//! Used by the rotation-prediction pretext task (Gidaris et al. 2018), whose label is `k`.

use rand::Rng as _;

use super::{Rng, Transform};
use crate::Image;

/// Rotate `img` by `k * 90` degrees counter-clockwise (`k` taken mod 4).
pub fn rotate90(img: Image, k: usize) -> Image {
    let k = k % 4;
    if k == 0 {
        return img;
    }
    let (c, h, w) = (img.channels, img.height, img.width);
    let (oh, ow) = if k == 2 { (h, w) } else { (w, h) };
    let mut out = vec![0u8; img.data.len()];
    for ch in 0..c {
        let src = &img.data[ch * h * w..(ch + 1) * h * w];
        let dst = &mut out[ch * oh * ow..(ch + 1) * oh * ow];
        for y in 0..oh {
            for x in 0..ow {
                // torch.rot90 with k=1: out[y, x] = in[x, W - 1 - y]
                let (sy, sx) = match k {
                    1 => (x, w - 1 - y),
                    2 => (h - 1 - y, w - 1 - x),
                    _ => (h - 1 - x, y),
                };
                dst[y * ow + x] = src[sy * w + sx];
            }
        }
    }
    Image::new(out, c, oh, ow)
}

/// Rotate by a uniformly drawn `k` in 0..4. The rotation method uses [`rotate90`] directly
/// because it needs `k` as the label.
#[derive(Clone, Debug, Default)]
pub struct RandomRotate90;

impl Transform for RandomRotate90 {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        let k = rng.random_range(0..4usize);
        rotate90(img, k)
    }
}
