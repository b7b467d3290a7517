//! Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization"): the encoder sees
//! only the lightness of an image and a small decoder head predicts its colour, the `a` and `b`
//! channels of CIELAB, on a coarse `g x g` grid (8 x 8 for CIFAR-10: Zhang et al. also predict
//! at a quarter of the resolution).
//!
//! The views arrive normalised; they are mapped back to RGB in [0, 1] with the dataset's mean
//! and standard deviation, converted to Lab ([`rgb_to_lab`], sRGB with the D65 white point),
//! and the encoder's input is `L / 100` replicated on the three channels and normalised again.
//! Targets are `ab` averaged over each grid cell. Two losses:
//! - [`ColorTarget::Regression`]: mean squared error on `ab / 110`;
//! - [`ColorTarget::Bins`]: `a` and `b` each quantised into `Q` bins over [-110, 110], a
//!   cross-entropy per cell and channel (the paper's classification view, with independent
//!   per-channel bins instead of its 313 joint in-gamut bins, to keep the head small).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use selfsup_models::heads::HeadBlock;
use selfsup_models::{Encoder, Head};

use crate::{scalar, Error, Pretext, Result, StepOutput};

/// What the decoder predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ColorTarget {
    /// `ab / 110` per cell, mean squared error.
    Regression,
    /// `Q` bins per channel, cross-entropy.
    Bins(usize),
}

impl std::str::FromStr for ColorTarget {
    type Err = Error;
    /// `regression` or `bins` (16 bins) or `bins:Q`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "regression" => Ok(Self::Regression),
            "bins" => Ok(Self::Bins(16)),
            s => match s.strip_prefix("bins:").and_then(|q| q.parse().ok()) {
                Some(q) if q >= 2 => Ok(Self::Bins(q)),
                _ => Err(Error::Config(format!(
                    "unknown colorization target {s:?} (known: regression, bins, bins:Q)"
                ))),
            },
        }
    }
}

/// Colorization hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ColorizationConfig {
    /// Decoder hidden width (512).
    pub hidden_dim: usize,
    /// Output grid side (8): the image side must be a multiple of it.
    pub grid: usize,
    /// Regression or bins.
    pub target: ColorTarget,
    /// Normalisation mean of the views (per RGB channel, in [0, 1] units).
    pub mean: [f32; 3],
    /// Normalisation standard deviation of the views.
    pub std: [f32; 3],
}

/// CIELAB (D65) of sRGB in [0, 1], `(N, 3, H, W)` to `(N, 3, H, W)` with `L` in [0, 100] and
/// `a`, `b` roughly in [-110, 110] (as `skimage.color.rgb2lab`). No gradient is needed here.
pub fn rgb_to_lab(rgb: &Tensor) -> Result<Tensor> {
    let rgb = rgb.to_dtype(DType::F32)?.clamp(0f32, 1f32)?;
    // sRGB -> linear
    let hi = rgb.affine(1.0 / 1.055, 0.055 / 1.055)?.powf(2.4)?;
    let lo = rgb.affine(1.0 / 12.92, 0.0)?;
    let lin = rgb.ge(0.04045f64)?.where_cond(&hi, &lo)?;
    let c = |i: usize| lin.narrow(1, i, 1);
    let (r, g, b) = (c(0)?, c(1)?, c(2)?);
    let mix = |wr: f64, wg: f64, wb: f64, white: f64| -> Result<Tensor> {
        Ok((((r.affine(wr / white, 0.0)? + g.affine(wg / white, 0.0)?)?
            + b.affine(wb / white, 0.0)?)?)
        .clamp(0f32, f32::INFINITY)?)
    };
    let x = mix(0.412453, 0.357580, 0.180423, 0.950456)?;
    let y = mix(0.212671, 0.715160, 0.072169, 1.0)?;
    let z = mix(0.019334, 0.119193, 0.950227, 1.088754)?;
    let delta: f64 = 6.0 / 29.0;
    let f = |t: &Tensor| -> Result<Tensor> {
        let cube = t.powf(1.0 / 3.0)?;
        let lin = t.affine(1.0 / (3.0 * delta * delta), 4.0 / 29.0)?;
        Ok(t.gt(delta.powi(3))?.where_cond(&cube, &lin)?)
    };
    let (fx, fy, fz) = (f(&x)?, f(&y)?, f(&z)?);
    let l = fy.affine(116.0, -16.0)?;
    let a = ((&fx - &fy)? * 500.0)?;
    let bb = ((&fy - &fz)? * 200.0)?;
    Ok(Tensor::cat(&[&l, &a, &bb], 1)?)
}

/// The colorization task.
pub struct Colorization {
    head: Head,
    cfg: ColorizationConfig,
}

const AB_RANGE: f64 = 110.0;

impl Colorization {
    /// Decoder on `feature_dim` features, variables under `vb`.
    pub fn new(feature_dim: usize, cfg: &ColorizationConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.grid == 0 || cfg.std.iter().any(|s| *s <= 0.0) {
            return Err(Error::Config(
                "colorization needs a grid > 0 and positive standard deviations".into(),
            ));
        }
        let per_cell = match cfg.target {
            ColorTarget::Regression => 2,
            ColorTarget::Bins(q) => 2 * q,
        };
        let head = Head::new(
            &[
                HeadBlock::new(feature_dim, cfg.hidden_dim, true, true),
                HeadBlock::new(cfg.hidden_dim, per_cell * cfg.grid * cfg.grid, false, false),
            ],
            vb,
        )?;
        Ok(Self {
            head,
            cfg: cfg.clone(),
        })
    }

    /// The grey input (normalised) and the `(N, 2, g, g)` `ab` targets of normalised views.
    pub fn inputs_and_targets(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        let g = self.cfg.grid;
        if c != 3 || h % g != 0 || w % g != 0 {
            return Err(Error::Config(format!(
                "colorization needs RGB images whose sides are multiples of {g}, got {c}x{h}x{w}"
            )));
        }
        let (lab, grey) = lab_and_grey(x, &self.cfg.mean, &self.cfg.std)?;
        let ab = lab.narrow(1, 1, 2)?.avg_pool2d((h / g, w / g))?;
        Ok((grey, ab))
    }
}

/// `(N, 3, H, W)` normalised RGB to its Lab image and the encoder's grey input (`L / 100` on
/// three channels, normalised with the same statistics).
fn lab_and_grey(x: &Tensor, mean: &[f32; 3], std: &[f32; 3]) -> Result<(Tensor, Tensor)> {
    let (n, _, h, w) = x.dims4()?;
    let m = Tensor::new(mean, x.device())?.reshape((1, 3, 1, 1))?;
    let s = Tensor::new(std, x.device())?.reshape((1, 3, 1, 1))?;
    let x = x.detach().to_dtype(DType::F32)?;
    let rgb = x.broadcast_mul(&s)?.broadcast_add(&m)?;
    let lab = rgb_to_lab(&rgb)?;
    let l = (lab.narrow(1, 0, 1)? / 100.0)?.broadcast_as((n, 3, h, w))?;
    let grey = l.broadcast_sub(&m)?.broadcast_div(&s)?.contiguous()?;
    Ok((lab, grey))
}

/// The grey image a colorization encoder sees of normalised RGB views `(N, 3, H, W)`: `L / 100`
/// of CIELAB replicated on the three channels and normalised with `mean` / `std`, in the dtype
/// of `x`. Exactly the input [`Colorization`] trains the encoder on.
pub fn grey_input(x: &Tensor, mean: &[f32; 3], std: &[f32; 3]) -> Result<Tensor> {
    if x.dims().len() != 4 || x.dim(1)? != 3 {
        return Err(Error::Config(format!(
            "a grey input needs (N, 3, H, W) RGB images, got {:?}",
            x.dims()
        )));
    }
    Ok(lab_and_grey(x, mean, std)?.1.to_dtype(x.dtype())?)
}

/// An encoder that was trained by colorization alone, seen from outside: it converts normalised
/// RGB images to their [`grey_input`] first. Features for kNN, the linear probe, retrieval and
/// embedding export must come through it: the encoder never saw colour while it trained, and
/// fed colour its features are far worse (measured in docs/methods.md).
pub struct GreyInput {
    inner: Box<dyn Encoder>,
    mean: [f32; 3],
    std: [f32; 3],
}

impl GreyInput {
    /// Wrap `inner`; `mean` / `std` are the statistics the images are normalised with.
    pub fn new(inner: Box<dyn Encoder>, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self { inner, mean, std }
    }

    /// The wrapped encoder (which takes grey inputs).
    pub fn inner(&self) -> &dyn Encoder {
        self.inner.as_ref()
    }

    fn grey(&self, x: &Tensor) -> selfsup_models::Result<Tensor> {
        grey_input(x, &self.mean, &self.std).map_err(Into::into)
    }
}

impl Encoder for GreyInput {
    fn forward_t(&self, x: &Tensor, train: bool) -> selfsup_models::Result<Tensor> {
        self.inner.forward_t(&self.grey(x)?, train)
    }

    fn features(&self, x: &Tensor) -> selfsup_models::Result<Tensor> {
        self.inner.features(&self.grey(x)?)
    }

    fn feature_dim(&self) -> usize {
        self.inner.feature_dim()
    }
}

impl Pretext for Colorization {
    fn name(&self) -> &str {
        "colorization"
    }

    fn encoder_input(&self, x: &Tensor) -> Result<Tensor> {
        grey_input(x, &self.cfg.mean, &self.cfg.std)
    }

    fn loss(&self, encoder: &dyn Encoder, views: &[Tensor]) -> Result<StepOutput> {
        let x = Tensor::cat(views, 0)?;
        let (grey, ab) = self.inputs_and_targets(&x)?;
        let feats = encoder.forward_t(&grey, true)?;
        let out = self.head.forward_t(&feats, true)?;
        let n = x.dim(0)?;
        let g = self.cfg.grid;
        let (loss, metric) = match self.cfg.target {
            ColorTarget::Regression => {
                let pred = out.reshape((n, 2, g, g))?;
                let target = (ab / AB_RANGE)?;
                let loss = (pred - target)?.sqr()?.mean_all()?;
                let rmse = scalar(&loss)?.sqrt() * AB_RANGE;
                (loss, ("color_rmse_ab".to_string(), rmse))
            }
            ColorTarget::Bins(q) => {
                let logits = out
                    .reshape((n, 2, q, g, g))?
                    .permute((0, 1, 3, 4, 2))?
                    .reshape((n * 2 * g * g, q))?;
                let bins = ((ab + AB_RANGE)? * (q as f64 / (2.0 * AB_RANGE)))?
                    .floor()?
                    .clamp(0f32, (q - 1) as f32)?
                    .flatten_all()?
                    .to_dtype(DType::U32)?;
                let loss = selfsup_losses::ops::cross_entropy(&logits, &bins)?;
                let acc = scalar(
                    &logits
                        .argmax(D::Minus1)?
                        .eq(&bins)?
                        .to_dtype(DType::F32)?
                        .mean_all()?,
                )?;
                (loss, ("color_bin_acc".to_string(), acc))
            }
        };
        Ok(StepOutput {
            loss,
            metrics: vec![metric],
            embeddings: feats.narrow(0, 0, views[0].dim(0)?)?.detach(),
        })
    }
}
