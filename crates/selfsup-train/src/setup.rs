//! Build a [`Trainer`] from a [`TrainConfig`] and datasets: the method, the augmenting loader
//! and the kNN monitor.

use std::sync::Arc;

use candle_core::DType;
use selfsup_data::{
    preset_views, preset_views_multicrop, Dataset, InMemory, Loader, LoaderConfig, Normalize,
    Preset,
};
use selfsup_dist::Comm;
use selfsup_methods::{
    Barlow, BarlowConfig, Byol, ByolConfig, Colorization, ColorizationConfig, GreyInput, Hybrid,
    Method, Moco, MocoConfig, Momentum, PairsConfig, PairsMethod, Placement, Pretext,
    PretextBuilder, PretextMethod, Rotation, SimClr, SimClrConfig, SimSiam, SimSiamConfig,
    SupConConfig, SupConMethod, Supervised, VicregConfig, VicregMethod,
};
use selfsup_models::{Encoder, EncoderKind};

use crate::{parse_device, Error, KnnMonitor, Result, TrainConfig, Trainer};

/// Methods `selfsup train --method` accepts (besides hybrids `A+P`, `A` any of these but the
/// pretext tasks and `P` one of [`PRETEXT_TASKS`]).
pub const METHODS: &[&str] = &[
    "simclr",
    "moco",
    "byol",
    "simsiam",
    "barlow",
    "vicreg",
    "supcon",
    "pairs",
    "rotation",
    "colorization",
    "supervised",
];

/// Pretext tasks, usable alone or as the auxiliary part of a hybrid.
pub const PRETEXT_TASKS: &[&str] = &["rotation", "colorization"];

/// Methods that train with labels.
pub const LABELLED_METHODS: &[&str] = &["supcon", "supervised"];

/// Whether `name` is a method or a hybrid `A+P` that [`build_method`] knows.
pub fn check_method_name(name: &str) -> Result<()> {
    let known = || {
        format!(
            "known: {}, or A+P with P one of {}",
            METHODS.join(", "),
            PRETEXT_TASKS.join(", ")
        )
    };
    match name.split_once('+') {
        None if METHODS.contains(&name) => Ok(()),
        Some((a, p))
            if METHODS.contains(&a)
                && !PRETEXT_TASKS.contains(&a)
                && PRETEXT_TASKS.contains(&p) =>
        {
            Ok(())
        }
        _ => Err(Error::Config(format!(
            "unknown method {name:?} ({})",
            known()
        ))),
    }
}

/// The data of a run.
#[derive(Clone)]
pub struct RunData {
    /// Training images (labels, if any, are ignored by self-supervised methods).
    pub train: Arc<InMemory>,
    /// Labelled test images for the kNN monitor, if any.
    pub test: Option<Arc<InMemory>>,
    /// Normalisation statistics.
    pub normalize: Normalize,
}

fn momentum(cfg: &TrainConfig) -> Momentum {
    Momentum {
        base: cfg.momentum_tau,
        cosine: cfg.momentum_cosine,
    }
}

fn pretext(
    name: &str,
    cfg: &TrainConfig,
    normalize: &Normalize,
) -> Result<Box<PretextBuilder<'static>>> {
    let hidden = cfg.proj_hidden;
    match name {
        "rotation" => Ok(Box::new(move |d, vb| {
            Ok(Box::new(Rotation::new(d, hidden, vb)?) as Box<dyn Pretext>)
        })),
        "colorization" => {
            let ccfg = ColorizationConfig {
                hidden_dim: hidden,
                grid: 8.min(cfg.image_size),
                target: cfg
                    .color_target
                    .parse()
                    .map_err(|e: selfsup_methods::Error| Error::Config(e.to_string()))?,
                mean: normalize.mean,
                std: normalize.std,
            };
            Ok(Box::new(move |d, vb| {
                Ok(Box::new(Colorization::new(d, &ccfg, vb)?) as Box<dyn Pretext>)
            }))
        }
        p => Err(Error::Config(format!("unknown pretext task {p:?}"))),
    }
}

/// Build the method named in `cfg` (or a hybrid `A+P`); `classes` is needed by `supervised`
/// (which uses labels), `normalize` by colorization (which maps views back to colours).
pub fn build_method(
    cfg: &TrainConfig,
    classes: Option<usize>,
    normalize: &Normalize,
    at: &Placement,
) -> Result<Box<dyn Method>> {
    check_method_name(&cfg.method)?;
    // Every BatchNorm built below synchronises over the ranks when asked to.
    let _sync = selfsup_models::layers::sync_batch_norm_scope(cfg.sync_bn.then(|| at.comm.clone()));
    let kind: EncoderKind = cfg
        .encoder
        .parse()
        .map_err(|e: selfsup_models::Error| Error::Config(e.to_string()))?;
    let (base, aux) = match cfg.method.split_once('+') {
        Some((a, p)) => (a, Some(p)),
        None => (cfg.method.as_str(), None),
    };
    let (h, o, seed) = (cfg.proj_hidden, cfg.proj_out, cfg.seed);
    let method: Box<dyn Method> = match base {
        "simclr" => Box::new(SimClr::new(
            &kind,
            &SimClrConfig {
                hidden_dim: h,
                out_dim: o,
                temperature: cfg.temperature,
            },
            seed,
            at,
        )?),
        "moco" => Box::new(Moco::new(
            &kind,
            &MocoConfig {
                hidden_dim: h,
                out_dim: o,
                temperature: cfg.temperature,
                queue_size: cfg.queue_size,
                momentum: momentum(cfg),
                symmetric: cfg.symmetric,
            },
            seed,
            at,
        )?),
        "byol" => Box::new(Byol::new(
            &kind,
            &ByolConfig {
                hidden_dim: h,
                out_dim: o,
                pred_hidden: cfg.pred_hidden,
                momentum: momentum(cfg),
            },
            seed,
            at,
        )?),
        "simsiam" => Box::new(SimSiam::new(
            &kind,
            &SimSiamConfig {
                hidden_dim: h,
                out_dim: o,
                pred_hidden: cfg.pred_hidden,
            },
            seed,
            at,
        )?),
        "barlow" => Box::new(Barlow::new(
            &kind,
            &BarlowConfig {
                hidden_dim: h,
                out_dim: o,
                ..Default::default()
            },
            seed,
            at,
        )?),
        "vicreg" => Box::new(VicregMethod::new(
            &kind,
            &VicregConfig {
                hidden_dim: h,
                out_dim: o,
                ..Default::default()
            },
            seed,
            at,
        )?),
        "supcon" => Box::new(SupConMethod::new(
            &kind,
            &SupConConfig {
                hidden_dim: h,
                out_dim: o,
                temperature: cfg.temperature,
            },
            seed,
            at,
        )?),
        "pairs" => Box::new(PairsMethod::new(
            &kind,
            &PairsConfig {
                hidden_dim: h,
                out_dim: o,
                loss: cfg
                    .pair_loss
                    .parse()
                    .map_err(|e: selfsup_methods::Error| Error::Config(e.to_string()))?,
                margin: cfg.margin,
                use_labels: cfg.pair_labels,
            },
            seed,
            at,
        )?),
        "rotation" | "colorization" => Box::new(PretextMethod::new(
            &kind,
            seed,
            at,
            &format!("{base}_head"),
            pretext(base, cfg, normalize)?,
        )?),
        "supervised" => {
            let classes = classes.filter(|&c| c > 0).ok_or_else(|| {
                Error::Config("method supervised needs a labelled dataset".into())
            })?;
            Box::new(Supervised::new(&kind, classes, seed, at)?)
        }
        m => return Err(Error::Config(format!("unknown method {m:?}"))),
    };
    match aux {
        None => Ok(method),
        Some(p) => Ok(Box::new(Hybrid::new(
            method,
            cfg.aux_weight,
            seed ^ 0x5eed_a0c5,
            at,
            &format!("{p}_head"),
            pretext(p, cfg, normalize)?,
        )?)),
    }
}

/// The encoder of a run trained with `cfg`, as feature consumers must call it: an encoder
/// trained by colorization alone saw only grey images, so it gets [`GreyInput`] in front
/// (with the statistics the images are normalised with); every other encoder takes the images
/// as they are. ([`PretextMethod`] does the same for the kNN monitor during training.)
pub fn inference_encoder(
    cfg: &TrainConfig,
    encoder: Box<dyn Encoder>,
    normalize: &Normalize,
) -> Box<dyn Encoder> {
    if cfg.method == "colorization" {
        Box::new(GreyInput::new(encoder, normalize.mean, normalize.std))
    } else {
        encoder
    }
}

/// A rough estimate of a training process's peak memory for `cfg` (bytes, one rank of
/// `world`): activations from measured peaks (SimCLR, 32x32 images, batch 256, two views:
/// small-cnn 626 MiB, resnet18 3,158 MiB, docs/benchmarks.md) scaled by views per rank, image
/// area, width and stem, plus 20 bytes per parameter (weights, gradients, optimiser state,
/// targets, checkpoint buffers). It errs low; it exists to refuse absurd settings (an image
/// size of 100,000, a width of 1e11) with one line before anything is allocated.
pub fn estimated_peak_bytes(cfg: &TrainConfig, world: usize) -> Result<f64> {
    let kind: EncoderKind = cfg
        .encoder
        .parse()
        .map_err(|e: selfsup_models::Error| Error::Config(e.to_string()))?;
    const MIB: f64 = 1024.0 * 1024.0;
    let (per_view, params) = match &kind {
        EncoderKind::SmallCnn => (1.2 * MIB, 0.4e6),
        EncoderKind::SmallCnnWidths(w) | EncoderKind::SmallCnnPools { widths: w, .. } => {
            // Activations scale with the widths (and 4x per layer past the last max-pool),
            // parameters with products of neighbours.
            let pools = match &kind {
                EncoderKind::SmallCnnPools { pools, .. } => *pools,
                _ => 3,
            };
            let act = w
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f64 * 4f64.powi(i.saturating_sub(pools) as i32))
                .sum::<f64>()
                / 480.0;
            let p = (27 * w[0] + 9 * (w[0] * w[1] + w[1] * w[2] + w[2] * w[3])) as f64;
            (1.2 * MIB * act, p)
        }
        EncoderKind::ConvnetSeed => (1.0 * MIB, 2.2e6),
        EncoderKind::ResNet(r) => {
            let (act, p) = match r.depth {
                18 => (6.2, 11.2e6),
                34 => (11.0, 21.3e6),
                _ => (19.0, 23.5e6),
            };
            let stem = match r.stem {
                selfsup_models::Stem::Cifar => 1.0,
                selfsup_models::Stem::Imagenet => 1.0 / 16.0,
            };
            (act * MIB * r.width * stem, p * r.width * r.width)
        }
    };
    let views = 2.0 * (cfg.batch_size / world.max(1)).max(1) as f64;
    let area = (cfg.image_size as f64 / 32.0).powi(2);
    Ok(views * per_view * area + 20.0 * params)
}

/// A trainer for `cfg` over `data`, in one process.
pub fn build_trainer(cfg: &TrainConfig, data: RunData) -> Result<Trainer> {
    build_trainer_dist(cfg, data, selfsup_dist::single())
}

/// A trainer for `cfg` over `data` as one rank of `comm`: the loader yields this rank's part of
/// every global batch, the method gathers embeddings from every rank, BatchNorm synchronises
/// with `cfg.sync_bn`.
pub fn build_trainer_dist(cfg: &TrainConfig, data: RunData, comm: Comm) -> Result<Trainer> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let at = Placement {
        device,
        dtype: DType::F32,
        comm: comm.clone(),
    };
    let classes = data
        .train
        .labels
        .as_ref()
        .map(|_| data.train.class_names.len());
    let base = cfg.method.split('+').next().unwrap_or_default();
    if (LABELLED_METHODS.contains(&base) || (base == "pairs" && cfg.pair_labels))
        && data.train.labels.is_none()
    {
        return Err(Error::Config(format!(
            "method {} uses labels, and the training data has none",
            cfg.method
        )));
    }
    let method = build_method(cfg, classes, &data.normalize, &at)?;
    if cfg.patch_whitening {
        // A fresh method's first layer; a resumed run loads its checkpoint over it.
        crate::whiten::whiten_first_conv(method.as_ref(), &data.train, &data.normalize)?;
    }
    build_trainer_with_dist(cfg, data, method, comm)
}

/// A trainer for `cfg` over `data` with a method built elsewhere (fine-tuning, baselines).
pub fn build_trainer_with(
    cfg: &TrainConfig,
    data: RunData,
    method: Box<dyn Method>,
) -> Result<Trainer> {
    build_trainer_with_dist(cfg, data, method, selfsup_dist::single())
}

/// [`build_trainer_with`] as one rank of `comm` (the method must have been built with the same
/// `comm` in its [`Placement`]).
pub fn build_trainer_with_dist(
    cfg: &TrainConfig,
    data: RunData,
    method: Box<dyn Method>,
    comm: Comm,
) -> Result<Trainer> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let preset: Preset = cfg.augment.parse()?;
    let train: Arc<InMemory> = if cfg.train_subset > 0 && cfg.train_subset < data.train.len() {
        Arc::new(
            data.train
                .subset(&(0..cfg.train_subset).collect::<Vec<_>>()),
        )
    } else {
        data.train.clone()
    };
    let lc = LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        drop_last: true,
        seed: cfg.seed,
        threads: cfg.threads,
        prefetch: 3,
        shard: (comm.rank(), comm.world_size()),
    };
    let loader = Loader::new(
        train.clone(),
        preset_views_multicrop(
            preset,
            cfg.global_view_size(),
            cfg.crop_min_scale,
            cfg.jitter_scale,
            &cfg.local_crops_config(),
            data.normalize.clone(),
        )?,
        lc.clone(),
    )?;
    let monitor = match (&data.test, train.labels.is_some(), cfg.knn_every > 0) {
        (Some(test), true, true) => {
            let test: Arc<InMemory> = if cfg.knn_test_subset > 0 && cfg.knn_test_subset < test.len()
            {
                Arc::new(test.subset(&(0..cfg.knn_test_subset).collect::<Vec<_>>()))
            } else {
                test.clone()
            };
            let classes = train.class_names.len().max(test.class_names.len());
            // Each rank extracts the features of its contiguous share.
            let share = |ds: &Arc<InMemory>| -> Arc<InMemory> {
                if comm.world_size() == 1 {
                    return ds.clone();
                }
                let r = crate::shard_range(ds.len(), comm.rank(), comm.world_size());
                Arc::new(ds.subset(&r.collect::<Vec<_>>()))
            };
            Some(KnnMonitor {
                bank: Loader::for_eval(
                    share(&train),
                    cfg.image_size,
                    data.normalize.clone(),
                    cfg.threads,
                )?,
                test: Loader::for_eval(
                    share(&test),
                    cfg.image_size,
                    data.normalize.clone(),
                    cfg.threads,
                )?,
                classes,
            })
        }
        _ => None,
    };
    encoder_takes(method.as_ref(), cfg, &device)?;
    // Precise BatchNorm after the last epoch: whole training images, shuffled (a batch of one
    // class would have other statistics), this rank's part of each global batch.
    let bn_data = if cfg.bn_recalibrate {
        if train.len() < cfg.batch_size {
            return Err(Error::Config(format!(
                "bn_recalibrate needs at least one batch of {} training images, the data has {}",
                cfg.batch_size,
                train.len()
            )));
        }
        Some(Loader::new(
            train.clone(),
            preset_views(Preset::None, cfg.image_size, data.normalize.clone()),
            LoaderConfig { prefetch: 2, ..lc },
        )?)
    } else {
        None
    };
    let mut trainer = Trainer::new_dist(cfg.clone(), method, loader, monitor, device, comm)?;
    if let Some(d) = bn_data {
        trainer.set_bn_data(d);
    }
    Ok(trainer)
}

/// An image size the encoder cannot take (too small for its downsampling) is refused before the
/// run starts: one forward pass of two blank images in eval mode (no state changes).
fn encoder_takes(
    method: &dyn Method,
    cfg: &TrainConfig,
    device: &candle_core::Device,
) -> Result<()> {
    let dtype = method
        .varmap()
        .all_vars()
        .first()
        .map_or(DType::F32, |v| v.dtype());
    let mut sizes = vec![("image_size", cfg.image_size)];
    if cfg.global_view_size() != cfg.image_size {
        sizes.push(("crop_size", cfg.crop_size));
    }
    if cfg.local_crops > 0 {
        sizes.push(("local_crop_size", cfg.local_crop_size));
    }
    for (what, s) in sizes {
        let x = candle_core::Tensor::zeros((2, 3, s, s), dtype, device)?;
        method.encoder().forward_t(&x, false).map_err(|e| {
            let msg = e.to_string();
            Error::Config(format!(
                "{what} {s} does not fit encoder {}: {}",
                cfg.encoder,
                msg.lines().next().unwrap_or_default()
            ))
        })?;
    }
    Ok(())
}
