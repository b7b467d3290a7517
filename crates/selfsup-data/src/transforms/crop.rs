//! Random resized crop (`RandomResizedCrop(size, scale, ratio)`, bilinear, antialias).
//!
//! Crop box, as torchvision's `get_params`: up to 10 tries of
//! `area' = H W U(scale)`, `r = exp(U(log ratio))`, `w = round(sqrt(area' r))`,
//! `h = round(sqrt(area' / r))`; accepted when `0 < w <= W` and `0 < h <= H`, then
//! `top = randint(0, H - h + 1)`, `left = randint(0, W - w + 1)`. Otherwise a centre crop with
//! the aspect ratio clamped into `ratio`.
//!
//! Resize: separable triangle filter with support `max(scale, 1)` (PIL / torch
//! `antialias=True`), horizontal pass first, each pass rounded to `u8` as torch's `uint8`
//! kernel does. When upsampling this is ordinary bilinear with `align_corners=False`.

use rand::Rng as _;

use super::{uniform, Rng, Transform};
use crate::Image;

/// A crop box: `top`, `left`, `height`, `width` in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Draw a crop box as torchvision's `RandomResizedCrop.get_params`.
pub fn crop_params(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0.min(ratio.1) {
        let w = width;
        (
            ((w as f64) / ratio.0.min(ratio.1)).round_ties_even() as usize,
            w,
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        let h = height;
        (
            h,
            ((h as f64) * ratio.0.max(ratio.1)).round_ties_even() as usize,
        )
    } else {
        (height, width)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Filter taps for one output coordinate: first input index and normalised weights.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

fn taps(in_len: usize, out_len: usize) -> Taps {
    let scale = in_len as f64 / out_len as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(out_len),
        len: Vec::with_capacity(out_len),
        weights: vec![0.0; out_len * stride],
        stride,
    };
    for o in 0..out_len {
        let center = scale * (o as f64 + 0.5);
        let xmin = ((center - support + 0.5).trunc() as isize).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as usize).min(in_len);
        let n = xmax - xmin;
        let w = &mut t.weights[o * stride..o * stride + n];
        let mut total = 0.0;
        for (j, wj) in w.iter_mut().enumerate() {
            let x = ((j + xmin) as f64 - center + 0.5) * inv;
            let v = (1.0 - x.abs()).max(0.0);
            *wj = v as f32;
            total += v;
        }
        if total > 0.0 {
            for wj in w.iter_mut() {
                *wj = (*wj as f64 / total) as f32;
            }
        }
        t.start.push(xmin);
        t.len.push(n);
    }
    t
}

/// Crop `b` out of `img` and resize it to `out_h x out_w` (antialiased bilinear).
pub fn resized_crop(img: &Image, b: CropBox, out_h: usize, out_w: usize) -> Image {
    let (c, h, w) = (img.channels, img.height, img.width);
    assert!(
        b.top + b.height <= h && b.left + b.width <= w,
        "crop box {b:?} outside {h}x{w}"
    );
    let th = taps(b.width, out_w);
    let tv = taps(b.height, out_h);
    let mut out = vec![0u8; c * out_h * out_w];
    let mut tmp = vec![0u8; b.height * out_w];
    for ch in 0..c {
        let src = img.plane(ch);
        // Horizontal pass: rows of the crop -> out_w columns.
        for y in 0..b.height {
            let row = &src[(b.top + y) * w + b.left..(b.top + y) * w + b.left + b.width];
            let trow = &mut tmp[y * out_w..(y + 1) * out_w];
            if b.width == out_w {
                trow.copy_from_slice(row);
                continue;
            }
            for (x, t) in trow.iter_mut().enumerate() {
                let s = th.start[x];
                let ws = &th.weights[x * th.stride..x * th.stride + th.len[x]];
                let mut acc = 0.0f32;
                for (k, &wk) in ws.iter().enumerate() {
                    acc += wk * row[s + k] as f32;
                }
                *t = super::round_u8(acc);
            }
        }
        // Vertical pass.
        let dst = &mut out[ch * out_h * out_w..(ch + 1) * out_h * out_w];
        if b.height == out_h {
            dst.copy_from_slice(&tmp);
            continue;
        }
        let mut acc = vec![0.0f32; out_w];
        for y in 0..out_h {
            acc.iter_mut().for_each(|a| *a = 0.0);
            let s = tv.start[y];
            let ws = &tv.weights[y * tv.stride..y * tv.stride + tv.len[y]];
            for (k, &wk) in ws.iter().enumerate() {
                let trow = &tmp[(s + k) * out_w..(s + k + 1) * out_w];
                for (a, &v) in acc.iter_mut().zip(trow) {
                    *a += wk * v as f32;
                }
            }
            for (d, &a) in dst[y * out_w..(y + 1) * out_w].iter_mut().zip(&acc) {
                *d = super::round_u8(a);
            }
        }
    }
    Image::new(out, c, out_h, out_w)
}

/// Random resized crop to a square of side `size`.
#[derive(Clone, Debug)]
pub struct RandomResizedCrop {
    /// Output side.
    pub size: usize,
    /// Range of the crop's area as a fraction of the image (SimCLR: 0.08 to 1).
    pub scale: (f64, f64),
    /// Range of aspect ratios (default 3/4 to 4/3).
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// torchvision defaults: scale 0.08-1, ratio 3/4-4/3.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, img: Image, rng: &mut Rng) -> Image {
        let b = crop_params(img.height, img.width, self.scale, self.ratio, rng);
        resized_crop(&img, b, self.size, self.size)
    }
}
