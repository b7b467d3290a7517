//! Feature extraction in eval mode.

use candle_core::{Device, Tensor};
use selfsup_data::Loader;
use selfsup_models::Encoder;

use crate::Result;

/// Features of a whole dataset.
#[derive(Debug, Clone)]
pub struct Features {
    /// `(N, D)` `f32` on the CPU, in dataset order.
    pub x: Tensor,
    /// Labels, when the dataset has them.
    pub labels: Option<Vec<usize>>,
}

/// Test-time augmentation of feature extraction. Ordered by the views each averages (1, 2, 6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tta {
    /// The image only (the standard protocol).
    #[default]
    None,
    /// The mean of the features of the image and of its mirror image (left-right flip).
    Flip,
    /// The mean over six views: the image and its mirror image, each as it is, shifted one
    /// pixel down and right, and shifted one pixel up and left ([`shift_replicate`]). The
    /// encoders pool by 2 several times over, so a one-pixel shift shows them the image on
    /// another pooling grid.
    FlipShift,
}

impl Tta {
    /// Forward passes per image: the cost against plain features.
    pub fn views(self) -> usize {
        match self {
            Self::None => 1,
            Self::Flip => 2,
            Self::FlipShift => 6,
        }
    }

    /// The features of `x` `(N, C, H, W)` under this augmentation.
    pub fn features(self, encoder: &dyn Encoder, x: &Tensor) -> Result<Tensor> {
        let f = encoder.features(x)?;
        let both = |x: &Tensor, f: Tensor| -> Result<Tensor> {
            Ok((f + encoder.features(&flip_horizontal(x)?)?)?)
        };
        Ok(match self {
            Self::None => f,
            Self::Flip => (both(x, f)? * 0.5)?,
            Self::FlipShift => {
                let mut sum = both(x, f)?;
                for d in [1, -1] {
                    let xs = shift_replicate(x, d, d)?;
                    let fs = encoder.features(&xs)?;
                    sum = (sum + both(&xs, fs)?)?;
                }
                (sum / 6.0)?
            }
        })
    }
}

impl std::str::FromStr for Tta {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "flip" => Ok(Self::Flip),
            "flip-shift" => Ok(Self::FlipShift),
            _ => Err(crate::Error::Input(format!(
                "unknown test-time augmentation {s:?} (known: none, flip, flip-shift)"
            ))),
        }
    }
}

impl std::fmt::Display for Tta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Flip => "flip",
            Self::FlipShift => "flip-shift",
        })
    }
}

/// `x` `(N, C, H, W)` mirrored left to right.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(3)?;
    let idx = Tensor::from_vec((0..w as u32).rev().collect::<Vec<u32>>(), w, x.device())?;
    Ok(x.index_select(&idx, 3)?)
}

/// `x` `(N, C, H, W)` moved `dy` pixels down and `dx` right (negative: up, left), its size
/// kept: the rows and columns that enter repeat the edge, the ones that leave are dropped.
pub fn shift_replicate(x: &Tensor, dy: isize, dx: isize) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, d) in [(2, dy), (3, dx)] {
        let (n, k) = (x.dim(dim)?, d.unsigned_abs());
        if k >= n {
            return Err(crate::Error::Input(format!(
                "a shift of {d} pixels in an image of {n}"
            )));
        }
        x = match d {
            0 => x,
            d if d > 0 => x.pad_with_same(dim, k, 0)?.narrow(dim, 0, n)?,
            _ => x.pad_with_same(dim, 0, k)?.narrow(dim, k, n)?,
        };
    }
    Ok(x.contiguous()?)
}

/// Run `encoder` in eval mode over every batch of `loader` (which should be unshuffled, keep
/// every image and use [`selfsup_data::Preset::None`]) on `device`.
pub fn extract_features(
    encoder: &dyn Encoder,
    loader: &Loader,
    device: &Device,
) -> Result<Features> {
    extract_features_tta(encoder, loader, device, Tta::None)
}

/// [`extract_features`] with test-time augmentation `tta`.
pub fn extract_features_tta(
    encoder: &dyn Encoder,
    loader: &Loader,
    device: &Device,
    tta: Tta,
) -> Result<Features> {
    let mut xs = Vec::new();
    let mut labels: Option<Vec<usize>> = Some(Vec::new());
    let mut order = Vec::new();
    for b in loader.epoch(0) {
        let b = b?;
        let x = b.views[0].to_device(device)?;
        // Without a graph: outputs of a model with variables carry it; keeping 100 batches of
        // graphs alive exhausted 24 GiB on CIFAR-10.
        let f = tta.features(encoder, &x)?;
        xs.push(
            f.to_device(&Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?,
        );
        match (&mut labels, &b.labels) {
            (Some(l), Some(t)) => l.extend(t.to_vec1::<u32>()?.into_iter().map(|v| v as usize)),
            _ => labels = None,
        }
        order.extend(b.indices);
    }
    let x = Tensor::cat(&xs, 0)?;
    // Put rows back in dataset order if the loader shuffled.
    if order.windows(2).any(|w| w[0] > w[1]) {
        let mut perm: Vec<u32> = vec![0; order.len()];
        for (row, &i) in order.iter().enumerate() {
            perm[i] = row as u32;
        }
        let idx = Tensor::from_vec(perm, order.len(), &Device::Cpu)?;
        let x = x.index_select(&idx, 0)?;
        let labels = labels.map(|l| {
            let mut out = vec![0; l.len()];
            for (row, &i) in order.iter().enumerate() {
                out[i] = l[row];
            }
            out
        });
        return Ok(Features { x, labels });
    }
    Ok(Features { x, labels })
}
