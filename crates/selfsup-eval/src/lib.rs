//! # selfsup-eval
//!
//! How good is a frozen encoder? Features are computed once, in eval mode, without augmentation
//! (normalisation only), then:
//!
//! - [`knn`]: weighted k-nearest-neighbour classification on cosine similarity (the InstDisc /
//!   MoCo monitor: k = 200, votes weighted by `exp(sim / 0.1)`);
//! - [`linear_probe`]: a linear classifier trained on the precomputed features (top-1, top-5);
//! - [`balanced_subset`]: a seeded, class-balanced fraction of the labels (low-label protocol);
//! - [`recalibrate_batch_norm`]: precise BatchNorm, the running statistics re-estimated on the
//!   images evaluation sees (the one step that changes the encoder: its BatchNorm buffers).
//!
//! Design choice: evaluation takes features as plain `(N, D)` tensors, so it works the same for
//! any encoder, a checkpoint or an exported embedding file.
#![warn(missing_docs)]

mod features;
mod knn;
mod linear;
mod precise_bn;

pub use features::{
    extract_features, extract_features_tta, flip_horizontal, shift_replicate, Features, Tta,
};
pub use knn::{knn, knn_predict, topk_accuracy, KnnConfig};
pub use linear::{linear_probe, LinearProbeConfig, ProbeResult};
pub use precise_bn::recalibrate_batch_norm;

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the models crate.
    #[error(transparent)]
    Model(#[from] selfsup_models::Error),
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] selfsup_data::Error),
    /// From the losses crate.
    #[error(transparent)]
    Loss(#[from] selfsup_losses::Error),
    /// Inputs that do not fit.
    #[error("{0}")]
    Input(String),
}

/// Rows scaled to unit L2 norm (`x / max(||x||, 1e-12)`, `F.normalize`): the one
/// implementation, [`selfsup_losses::ops::normalize`], under the name evaluation uses.
pub fn l2_normalize(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    Ok(selfsup_losses::ops::normalize(x)?)
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Features with a NaN or an infinity come from an encoder with non-finite weights or a
/// diverged run: no accuracy is computed from them.
pub(crate) fn check_finite(who: &str, what: &str, t: &candle_core::Tensor) -> Result<()> {
    let finite = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if finite {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "{who}: the {what} features hold NaN or infinite values (an encoder with non-finite weights or a diverged run); no accuracy is reported"
        )))
    }
}

/// Indices of a class-balanced subset holding `fraction` of each class (at least one per class),
/// drawn with `seed`; sorted.
pub fn balanced_subset(labels: &[usize], fraction: f64, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l].push(i);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for idx in by_class.iter_mut().filter(|v| !v.is_empty()) {
        idx.shuffle(&mut rng);
        let k = ((idx.len() as f64 * fraction).round() as usize).clamp(1, idx.len());
        out.extend_from_slice(&idx[..k]);
    }
    out.sort_unstable();
    out
}
