//! Precise BatchNorm: running statistics re-estimated on the images evaluation sees.
//!
//! During training a BatchNorm layer's running mean and variance follow the batches of
//! augmented views with momentum 0.1, so at the end they describe the last few hundred steps
//! of crops (smaller than the whole image, colour-jittered) drawn by weights that kept moving.
//! Evaluation feeds whole, unaugmented images to the final weights. Recalibration runs the
//! frozen encoder in training mode over such images and sets every running statistic to the
//! mean of the batch statistics ("precise BN", Wu and Johnson, *Rethinking "Batch" in
//! BatchNorm*, 2021; pycls's `compute_precise_bn_stats`). No weight changes and no label is
//! read; only the buffers that eval mode uses do.

use candle_core::Device;
use selfsup_data::Loader;
use selfsup_models::layers::with_bn_momentum;
use selfsup_models::Encoder;

use crate::Result;

/// Re-estimate the running statistics of every BatchNorm layer of `encoder` from at most
/// `max_batches` batches of `loader` (all: `None`), on `device`: a forward pass in training
/// mode per batch, the `i`-th with momentum `1 / i`, so that each running mean (variance) ends
/// as the mean of the batches' means (unbiased variances). `loader` should yield the images as
/// evaluation sees them (`selfsup_data::Preset::None`), shuffled, in full batches: a batch of
/// one class has other statistics than the data. Returns the number of images used.
///
/// With synchronised BatchNorm every rank must call it with the same number of batches (a
/// sharded loader gives each rank its part of the same global batches, and the statistics are
/// those of the global batch, as in training).
pub fn recalibrate_batch_norm(
    encoder: &dyn Encoder,
    loader: &Loader,
    device: &Device,
    max_batches: Option<usize>,
) -> Result<usize> {
    let mut images = 0;
    for (i, b) in loader
        .epoch(0)
        .take(max_batches.unwrap_or(usize::MAX))
        .enumerate()
    {
        let b = b?;
        let x = b.views[0].to_device(device)?;
        images += x.dim(0)?;
        let momentum = 1.0 / (i + 1) as f64;
        // The output (and the graph it carries) is dropped at once: only the running
        // statistics the forward updated are kept.
        with_bn_momentum(momentum, || encoder.forward_t(&x, true))?;
    }
    if images == 0 {
        return Err(crate::Error::Input(
            "BatchNorm recalibration got no batch of images".into(),
        ));
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Tensor};
    use candle_nn::VarMap;
    use selfsup_data::{preset_views, InMemory, LoaderConfig, Normalize, Preset};
    use selfsup_models::{build_encoder, seeded_var_builder};

    use super::*;

    fn images(n: usize, seed: u8) -> InMemory {
        let px: Vec<u8> = (0..n * 3 * 8 * 8)
            .map(|i| ((i * 37 + seed as usize * 101) % 251) as u8)
            .collect();
        InMemory {
            pixels: px,
            labels: None,
            class_names: Vec::new(),
            channels: 3,
            height: 8,
            width: 8,
        }
    }

    fn loader(ds: InMemory, batch: usize, shuffle: bool) -> Loader {
        Loader::new(
            Arc::new(ds),
            preset_views(Preset::None, 8, Normalize::cifar10()),
            LoaderConfig {
                batch_size: batch,
                shuffle,
                drop_last: true,
                seed: 3,
                threads: 1,
                prefetch: 1,
                shard: (0, 1),
            },
        )
        .unwrap()
    }

    /// The running statistics of the first BatchNorm after recalibration are the mean of the
    /// per-batch statistics of its input, computed here from the convolution alone.
    #[test]
    fn running_stats_are_the_mean_of_the_batch_statistics() {
        let vm = VarMap::new();
        let enc = build_encoder(
            &"small-cnn-w0.25".parse().unwrap(),
            seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = loader(images(24, 1), 8, false);
        let used = recalibrate_batch_norm(enc.as_ref(), &data, &Device::Cpu, None).unwrap();
        assert_eq!(used, 24);
        // The first layer's convolution, by hand, on the same batches.
        let w = vm.data().lock().unwrap()["conv1.weight"]
            .as_tensor()
            .clone();
        let (mut means, mut vars) = (Vec::new(), Vec::new());
        for b in data.epoch(0) {
            let x = b.unwrap().views[0].clone();
            let y = x.conv2d(&w, 1, 1, 1, 1).unwrap();
            let c = y.dim(1).unwrap();
            let per_c = y.transpose(0, 1).unwrap().flatten_from(1).unwrap();
            let n = per_c.dim(1).unwrap() as f64;
            let m = per_c.mean(1).unwrap();
            let v = per_c
                .broadcast_sub(&m.unsqueeze(1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .sum(1)
                .unwrap()
                .affine(1.0 / (n - 1.0), 0.0)
                .unwrap();
            assert_eq!(m.dim(0).unwrap(), c);
            means.push(m);
            vars.push(v);
        }
        let mean = (Tensor::stack(&means, 0).unwrap().mean(0).unwrap())
            .to_vec1::<f32>()
            .unwrap();
        let var = (Tensor::stack(&vars, 0).unwrap().mean(0).unwrap())
            .to_vec1::<f32>()
            .unwrap();
        let data = vm.data().lock().unwrap();
        let rm = data["bn1.running_mean"].to_vec1::<f32>().unwrap();
        let rv = data["bn1.running_var"].to_vec1::<f32>().unwrap();
        for c in 0..mean.len() {
            assert!((rm[c] - mean[c]).abs() < 1e-4, "{c}: {} {}", rm[c], mean[c]);
            assert!(
                (rv[c] - var[c]).abs() < 1e-4 * var[c].abs().max(1.0),
                "{c}: {} {}",
                rv[c],
                var[c]
            );
        }
        // Nothing but the buffers moved: the weights are those it started with.
        assert_eq!(
            data["conv1.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// The result does not depend on the statistics the layers had before: recalibrating twice
    /// gives the same buffers, and a layer's own momentum is back afterwards.
    #[test]
    fn recalibration_forgets_the_old_statistics() {
        let vm = VarMap::new();
        let enc = build_encoder(
            &"small-cnn-w0.25".parse().unwrap(),
            seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = loader(images(32, 2), 8, true);
        let buffers = |vm: &VarMap| -> Vec<Vec<f32>> {
            let d = vm.data().lock().unwrap();
            let mut names: Vec<&String> = d.keys().filter(|k| k.contains("running")).collect();
            names.sort();
            names
                .iter()
                .map(|n| d[*n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        recalibrate_batch_norm(enc.as_ref(), &data, &Device::Cpu, None).unwrap();
        let first = buffers(&vm);
        // Training-mode passes with the layers' own momentum move the statistics...
        let other = loader(images(16, 9), 8, false);
        for b in other.epoch(0) {
            enc.forward_t(&b.unwrap().views[0], true).unwrap();
        }
        assert_ne!(buffers(&vm), first);
        // ...and a second recalibration puts back exactly the first one's.
        recalibrate_batch_norm(enc.as_ref(), &data, &Device::Cpu, None).unwrap();
        assert_eq!(buffers(&vm), first);
        // At most 2 batches: 16 images.
        assert_eq!(
            recalibrate_batch_norm(enc.as_ref(), &data, &Device::Cpu, Some(2)).unwrap(),
            16
        );
        // No batch at all (the loader refuses a dataset smaller than its batch itself).
        assert!(recalibrate_batch_norm(enc.as_ref(), &data, &Device::Cpu, Some(0)).is_err());
    }
}
