//! `patch_whitening`: a fresh run's first convolution starts as patch-whitening filters
//! computed from its training images ([`selfsup_models::whitening`]).

use candle_core::Tensor;
use selfsup_data::{Dataset, InMemory, Normalize};
use selfsup_methods::Method;
use selfsup_models::whitening::{patch_second_moment, whitening_filters};

use crate::{Error, Result};

/// Training images whose patches give the statistics (the first ones of the dataset).
pub const WHITENING_IMAGES: usize = 5_000;

/// Added to each eigenvalue before its square root (airbench's value, on normalised pixels).
pub const WHITENING_EPS: f64 = 5e-4;

/// The variable patch whitening sets: the encoder's first convolution.
pub const FIRST_CONV: &str = "encoder.conv1.weight";

/// Set `method`'s first convolution `(C_out, C, k, k)` to whitening filters of the `k x k`
/// patches of the first [`WHITENING_IMAGES`] images of `train`, normalised with `norm`: the
/// eigenvectors of the `C_out / 2` largest eigenvalues (at most `C k^2`) and their negatives;
/// output channels beyond those keep their initial filters. Returns the number of filters set.
pub fn whiten_first_conv(method: &dyn Method, train: &InMemory, norm: &Normalize) -> Result<usize> {
    let vm = method.varmap();
    let data = vm.data().lock().unwrap();
    let Some(var) = data.get(FIRST_CONV) else {
        return Err(Error::Config(format!(
            "patch_whitening sets the encoder's first convolution `{FIRST_CONV}`, which this encoder does not have"
        )));
    };
    let (co, ci, kh, kw) = var.dims4()?;
    if kh != kw || ci != train.channels || ci > 3 {
        return Err(Error::Config(format!(
            "patch_whitening needs a square first convolution over the images' {} channels, got weight ({co}, {ci}, {kh}, {kw})",
            train.channels
        )));
    }
    let n = train.len().min(WHITENING_IMAGES);
    let (h, w) = (train.height, train.width);
    let px: Vec<f32> = train.pixels[..n * ci * h * w]
        .chunks_exact(h * w)
        .enumerate()
        .flat_map(|(plane, p)| {
            let ch = plane % ci;
            let (m, s) = (norm.mean[ch], norm.std[ch]);
            p.iter().map(move |&v| (v as f32 / 255.0 - m) / s)
        })
        .collect();
    let moment = patch_second_moment(&px, (n, ci, h, w), kh)?;
    let d = ci * kh * kh;
    let pairs = (co / 2).min(d);
    if pairs == 0 {
        return Err(Error::Config(format!(
            "patch_whitening needs at least 2 output channels in `{FIRST_CONV}`, got {co}"
        )));
    }
    let filters = whitening_filters(&moment, d, pairs, WHITENING_EPS)?;
    let mut weight: Vec<f32> = var
        .as_tensor()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    weight[..filters.len()].copy_from_slice(&filters);
    let t = Tensor::from_vec(weight, var.shape(), var.device())?.to_dtype(var.dtype())?;
    var.set(&t)?;
    Ok(2 * pairs)
}
