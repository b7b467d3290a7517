//! A synthetic labelled dataset for smoke tests and demos: oriented stripes on random colours.
//!
//! Class `c` of `classes` (at most 8) is a stripe pattern at angle `c * 180 / classes` degrees,
//! with a random frequency and phase, drawn over a strong random background colour. The colour
//! carries no label information and dominates a random encoder's features; the orientation
//! survives crops, horizontal flips (up to the mirror class pairing, which keeps horizontal and
//! vertical stripes apart) and colour jitter, so a contrastive method must learn to ignore colour
//! to separate the classes.

use rand::{Rng, SeedableRng};

use crate::InMemory;

const NOISE: f32 = 60.0;

/// How [`stripes_styled`] draws its images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StripesStyle {
    /// Range of each background channel (0-255).
    pub background: (f32, f32),
    /// Range of the stripes' amplitude (grey levels).
    pub amplitude: (f32, f32),
    /// Uniform pixel noise in `[-noise, noise]`.
    pub noise: f32,
    /// Range of the stripes' angular frequency (radians per pixel).
    pub frequency: (f32, f32),
}

impl Default for StripesStyle {
    /// The style of [`stripes`]: grey-ish backgrounds, strong stripes, strong pixel noise.
    fn default() -> Self {
        Self {
            background: (110.0, 146.0),
            amplitude: (25.0, 45.0),
            noise: NOISE,
            frequency: (0.5, 0.9),
        }
    }
}

/// `n` images of side `size` in `classes` classes (labels cycle `0, 1, ..`), from `seed`.
pub fn stripes(n: usize, size: usize, classes: usize, seed: u64) -> InMemory {
    stripes_styled(n, size, classes, seed, StripesStyle::default())
}

/// [`stripes`] with another [`StripesStyle`]: for example backgrounds over the whole colour
/// range and faint stripes, where colour dominates a random encoder's features.
pub fn stripes_styled(
    n: usize,
    size: usize,
    classes: usize,
    seed: u64,
    style: StripesStyle,
) -> InMemory {
    let classes = classes.clamp(2, 8);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let plane = size * size;
    let mut pixels = vec![0u8; n * 3 * plane];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        labels.push(c as u8);
        let angle = std::f32::consts::PI * c as f32 / classes as f32;
        let (s, co) = angle.sin_cos();
        let freq = rng.random_range(style.frequency.0..style.frequency.1);
        let phase = rng.random_range(0.0f32..std::f32::consts::TAU);
        let bg: [f32; 3] =
            std::array::from_fn(|_| rng.random_range(style.background.0..style.background.1));
        let amp = rng.random_range(style.amplitude.0..style.amplitude.1);
        let noise = style.noise;
        let img = &mut pixels[i * 3 * plane..(i + 1) * 3 * plane];
        for y in 0..size {
            for x in 0..size {
                let t = (x as f32 * co + y as f32 * s) * freq + phase;
                let v = amp * t.sin();
                for ch in 0..3 {
                    let e = if noise > 0.0 {
                        rng.random_range(-noise..noise)
                    } else {
                        0.0
                    };
                    img[ch * plane + y * size + x] = (bg[ch] + v + e).clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    InMemory {
        pixels,
        labels: Some(labels),
        class_names: (0..classes)
            .map(|c| format!("stripes-{}deg", c * 180 / classes))
            .collect(),
        channels: 3,
        height: size,
        width: size,
    }
}
