//! A view pipeline (a list of transforms then normalisation), multi-view sets, and the presets.

use std::sync::Arc;

use rand::SeedableRng;

use crate::transforms::{
    ColorJitter, GaussianBlur, HorizontalFlip, Normalize, RandomGrayscale, RandomResizedCrop, Rng,
    Solarize, Transform,
};
use crate::{Error, Image, Result};

/// Transforms applied in order, then [`Normalize`] to `f32`.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The `u8` transforms.
    pub transforms: Vec<Arc<dyn Transform>>,
    /// Final normalisation.
    pub normalize: Normalize,
}

impl Pipeline {
    /// Only normalisation (evaluation).
    pub fn eval(normalize: Normalize) -> Self {
        Self {
            transforms: vec![],
            normalize,
        }
    }

    /// Apply the `u8` transforms.
    pub fn augment(&self, mut img: Image, rng: &mut Rng) -> Image {
        for t in &self.transforms {
            img = t.apply(img, rng);
        }
        img
    }

    /// Apply everything, writing `f32` CHW into `out`. Returns the output shape `(C, H, W)`.
    pub fn apply_into(
        &self,
        img: Image,
        rng: &mut Rng,
        out: &mut Vec<f32>,
    ) -> (usize, usize, usize) {
        let img = self.augment(img, rng);
        let start = out.len();
        out.resize(start + img.data.len(), 0.0);
        self.normalize.apply_into(&img, &mut out[start..]);
        (img.channels, img.height, img.width)
    }
}

/// `N` views per image, each from its own pipeline (SimCLR: two of the same; BYOL: two different).
#[derive(Clone, Debug)]
pub struct MultiView {
    /// One pipeline per view.
    pub views: Vec<Pipeline>,
}

impl MultiView {
    /// `n` views from the same pipeline.
    pub fn repeat(p: Pipeline, n: usize) -> Self {
        Self { views: vec![p; n] }
    }

    /// Number of views.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Whether there are no views.
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }
}

/// Mix a seed with further words into an independent 64-bit seed (SplitMix64 finaliser).
pub fn mix_seed(seed: u64, words: &[u64]) -> u64 {
    let mut z = seed;
    for &w in words {
        z = z
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(w.wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// The generator for one (seed, epoch, item, view): independent of thread count and order.
pub fn item_rng(seed: u64, epoch: u64, index: u64, view: u64) -> Rng {
    Rng::seed_from_u64(mix_seed(seed, &[epoch, index, view]))
}

/// Named augmentation recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// SimCLR's CIFAR-10 recipe: crop 0.08-1, flip, jitter 0.4/0.4/0.4/0.1 (p 0.8),
    /// grayscale p 0.2, no blur.
    SimclrCifar,
    /// SimCLR's ImageNet recipe: as `SimclrCifar` plus Gaussian blur (p 0.5, sigma 0.1-2).
    SimclrImagenet,
    /// BYOL's asymmetric pair: view 1 blur p 1.0, no solarize; view 2 blur p 0.1, solarize p 0.2
    /// (jitter 0.4/0.4/0.2/0.1 p 0.8).
    Byol,
    /// Supervised training: random resized crop (scale 0.5-1) and horizontal flip, one view.
    CropFlip,
    /// No augmentation, normalisation only.
    None,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "simclr_cifar" | "simclr-cifar" => Ok(Self::SimclrCifar),
            "simclr_imagenet" | "simclr-imagenet" => Ok(Self::SimclrImagenet),
            "byol" => Ok(Self::Byol),
            "crop_flip" | "crop-flip" => Ok(Self::CropFlip),
            "none" => Ok(Self::None),
            _ => Err(Error::Config(format!(
                "unknown augmentation preset {s:?} (known: simclr_cifar, simclr_imagenet, byol, crop_flip, none)"
            ))),
        }
    }
}

fn simclr_base(size: usize, min_scale: f64, jitter: ColorJitter) -> Vec<Arc<dyn Transform>> {
    let crop = RandomResizedCrop {
        scale: (min_scale, 1.0),
        ..RandomResizedCrop::new(size)
    };
    cropped_base(crop, jitter)
}

fn cropped_base(crop: RandomResizedCrop, jitter: ColorJitter) -> Vec<Arc<dyn Transform>> {
    vec![
        Arc::new(crop),
        Arc::new(HorizontalFlip { p: 0.5 }),
        Arc::new(jitter),
        Arc::new(RandomGrayscale { p: 0.2 }),
    ]
}

fn simclr_jitter() -> ColorJitter {
    ColorJitter {
        brightness: 0.4,
        contrast: 0.4,
        saturation: 0.4,
        hue: 0.1,
        p: 0.8,
    }
}

/// The largest [`jitter_scale`](preset_views_multicrop) taken: it keeps every preset's hue
/// strength (at most 0.1) inside the `0..=0.5` a hue shift allows.
pub const MAX_JITTER_SCALE: f64 = 5.0;

/// `jitter` with its four strengths times `scale` (its probability unchanged), after checking
/// `0 <= scale <= MAX_JITTER_SCALE`.
fn scaled_jitter(jitter: ColorJitter, scale: f64) -> Result<ColorJitter> {
    if !(0.0..=MAX_JITTER_SCALE).contains(&scale) {
        return Err(Error::Config(format!(
            "jitter scale must be in 0..={MAX_JITTER_SCALE}, got {scale}"
        )));
    }
    let s = scale as f32;
    let j = ColorJitter {
        brightness: jitter.brightness * s,
        contrast: jitter.contrast * s,
        saturation: jitter.saturation * s,
        hue: jitter.hue * s,
        p: jitter.p,
    };
    j.validate()?;
    Ok(j)
}

/// Multi-crop (SwAV, Caron et al. 2020): besides a preset's two global views, `count` small
/// crops of a small part of the image, kept near their native resolution (side `size`, area
/// `scale` of the image) instead of upscaled, so each costs a fraction of a global view.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalCrops {
    /// Number of local views per image.
    pub count: usize,
    /// Side of a local view in pixels.
    pub size: usize,
    /// Range of a local crop's area as a fraction of the image.
    pub scale: (f64, f64),
}

impl LocalCrops {
    /// Checks the settings: a positive size, `0 < min <= max <= 1`.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.scale;
        if self.count > 0 && self.size == 0 {
            return Err(Error::Config("local crop size must be positive".into()));
        }
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(Error::Config(format!(
                "local crop scale must satisfy 0 < min <= max <= 1, got {lo}..{hi}"
            )));
        }
        Ok(())
    }
}

/// The pipeline of one local view of `preset`: its first view's photometric transforms after a
/// crop of `local.scale` of the area resized to `local.size` (the Gaussian blur, where the
/// preset has one, at probability 0.5 as in SwAV's and DINO's small crops), its colour jitter's
/// strengths times `jitter_scale` as in the global views.
pub fn preset_local_view(
    preset: Preset,
    local: &LocalCrops,
    jitter_scale: f64,
    normalize: Normalize,
) -> Result<Pipeline> {
    local.validate()?;
    let crop = RandomResizedCrop {
        scale: local.scale,
        ..RandomResizedCrop::new(local.size)
    };
    let jitter = scaled_jitter(simclr_jitter(), jitter_scale)?;
    let transforms = match preset {
        Preset::SimclrCifar => cropped_base(crop, jitter),
        Preset::SimclrImagenet | Preset::Byol => {
            let mut t = cropped_base(crop, jitter);
            t.push(Arc::new(GaussianBlur::simclr(local.size, 0.5)));
            t
        }
        Preset::CropFlip | Preset::None => {
            return Err(Error::Config(format!(
                "local crops need a two-view augmentation (simclr_cifar, simclr_imagenet, byol), not {preset:?}"
            )))
        }
    };
    Ok(Pipeline {
        transforms,
        normalize,
    })
}

/// The views of `preset` for images of side `size`, their random resized crops covering
/// `min_scale` to all of the image's area (the presets' own: [`DEFAULT_MIN_SCALE`]), their
/// colour jitter's four strengths times `jitter_scale` (1: the preset's own; 0: no jitter; at
/// most [`MAX_JITTER_SCALE`]), then `local.count` local views: global views first, local views
/// last (the order methods rely on).
pub fn preset_views_multicrop(
    preset: Preset,
    size: usize,
    min_scale: f64,
    jitter_scale: f64,
    local: &LocalCrops,
    normalize: Normalize,
) -> Result<MultiView> {
    if !(min_scale > 0.0 && min_scale <= 1.0) {
        return Err(Error::Config(format!(
            "crop min scale must satisfy 0 < min <= 1, got {min_scale}"
        )));
    }
    let mut views = preset_views_scaled(preset, size, min_scale, jitter_scale, normalize.clone())?;
    if local.count > 0 {
        let p = preset_local_view(preset, local, jitter_scale, normalize)?;
        views.views.extend(std::iter::repeat(p).take(local.count));
    }
    Ok(views)
}

/// The smallest area of a global view's random resized crop, as a fraction of the image, in
/// every two-view preset (SimCLR's 0.08).
pub const DEFAULT_MIN_SCALE: f64 = 0.08;

/// The views of a preset for images of side `size`.
pub fn preset_views(preset: Preset, size: usize, normalize: Normalize) -> MultiView {
    preset_views_scaled(preset, size, DEFAULT_MIN_SCALE, 1.0, normalize)
        .expect("the presets' own jitter is in range")
}

fn preset_views_scaled(
    preset: Preset,
    size: usize,
    min_scale: f64,
    jitter_scale: f64,
    normalize: Normalize,
) -> Result<MultiView> {
    let jitter = scaled_jitter(simclr_jitter(), jitter_scale)?;
    Ok(match preset {
        Preset::SimclrCifar => MultiView::repeat(
            Pipeline {
                transforms: simclr_base(size, min_scale, jitter),
                normalize,
            },
            2,
        ),
        Preset::SimclrImagenet => {
            let mut t = simclr_base(size, min_scale, jitter);
            t.push(Arc::new(GaussianBlur::simclr(size, 0.5)));
            MultiView::repeat(
                Pipeline {
                    transforms: t,
                    normalize,
                },
                2,
            )
        }
        Preset::Byol => {
            let jitter = scaled_jitter(
                ColorJitter {
                    brightness: 0.4,
                    contrast: 0.4,
                    saturation: 0.2,
                    hue: 0.1,
                    p: 0.8,
                },
                jitter_scale,
            )?;
            let mut v1 = simclr_base(size, min_scale, jitter.clone());
            v1.push(Arc::new(GaussianBlur::simclr(size, 1.0)));
            let mut v2 = simclr_base(size, min_scale, jitter);
            v2.push(Arc::new(GaussianBlur::simclr(size, 0.1)));
            v2.push(Arc::new(Solarize {
                threshold: 128,
                p: 0.2,
            }));
            MultiView {
                views: vec![
                    Pipeline {
                        transforms: v1,
                        normalize: normalize.clone(),
                    },
                    Pipeline {
                        transforms: v2,
                        normalize,
                    },
                ],
            }
        }
        Preset::CropFlip => MultiView::repeat(
            Pipeline {
                transforms: vec![
                    Arc::new(RandomResizedCrop {
                        scale: (0.5, 1.0),
                        ..RandomResizedCrop::new(size)
                    }),
                    Arc::new(HorizontalFlip { p: 0.5 }),
                ],
                normalize,
            },
            1,
        ),
        Preset::None => MultiView::repeat(Pipeline::eval(normalize), 1),
    })
}
