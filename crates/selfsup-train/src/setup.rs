//! Build a [`Trainer`] from a [`TrainConfig`] and datasets: the method, the augmenting loader
//! and the kNN monitor.

use std::sync::Arc;

use candle_core::DType;
use selfsup_data::{preset_views, Dataset, InMemory, Loader, LoaderConfig, Normalize, Preset};
use selfsup_methods::{Method, Placement, SimClr, SimClrConfig, Supervised};
use selfsup_models::EncoderKind;

use crate::{parse_device, Error, KnnMonitor, Result, TrainConfig, Trainer};

/// Methods `selfsup train --method` accepts.
pub const METHODS: &[&str] = &["simclr", "supervised"];

/// The data of a run.
pub struct RunData {
    /// Training images (labels, if any, are ignored by self-supervised methods).
    pub train: Arc<InMemory>,
    /// Labelled test images for the kNN monitor, if any.
    pub test: Option<Arc<InMemory>>,
    /// Normalisation statistics.
    pub normalize: Normalize,
}

/// Build the method named in `cfg`; `classes` is needed by `supervised` (which uses labels).
pub fn build_method(
    cfg: &TrainConfig,
    classes: Option<usize>,
    at: &Placement,
) -> Result<Box<dyn Method>> {
    let kind: EncoderKind = cfg
        .encoder
        .parse()
        .map_err(|e: selfsup_models::Error| Error::Config(e.to_string()))?;
    match cfg.method.as_str() {
        "simclr" => {
            let mcfg = SimClrConfig {
                hidden_dim: cfg.proj_hidden,
                out_dim: cfg.proj_out,
                temperature: cfg.temperature,
            };
            Ok(Box::new(SimClr::new(&kind, &mcfg, cfg.seed, at)?))
        }
        "supervised" => {
            let classes = classes.filter(|&c| c > 0).ok_or_else(|| {
                Error::Config("method supervised needs a labelled dataset".into())
            })?;
            Ok(Box::new(Supervised::new(&kind, classes, cfg.seed, at)?))
        }
        m => Err(Error::Config(format!(
            "unknown method {m:?} (known: {})",
            METHODS.join(", ")
        ))),
    }
}

fn eval_loader(
    ds: Arc<dyn Dataset>,
    cfg: &TrainConfig,
    normalize: &Normalize,
    size: usize,
) -> Result<Loader> {
    let lc = LoaderConfig {
        batch_size: 512,
        shuffle: false,
        drop_last: false,
        seed: cfg.seed,
        threads: cfg.threads,
        prefetch: 2,
    };
    Ok(Loader::new(
        ds,
        preset_views(Preset::None, size, normalize.clone()),
        lc,
    )?)
}

/// A trainer for `cfg` over `data`.
pub fn build_trainer(cfg: &TrainConfig, data: RunData) -> Result<Trainer> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let at = Placement {
        device,
        dtype: DType::F32,
    };
    let classes = data
        .train
        .labels
        .as_ref()
        .map(|_| data.train.class_names.len());
    let method = build_method(cfg, classes, &at)?;
    build_trainer_with(cfg, data, method)
}

/// A trainer for `cfg` over `data` with a method built elsewhere (fine-tuning, baselines).
pub fn build_trainer_with(
    cfg: &TrainConfig,
    data: RunData,
    method: Box<dyn Method>,
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
    };
    let loader = Loader::new(
        train.clone(),
        preset_views(preset, cfg.image_size, data.normalize.clone()),
        lc,
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
            Some(KnnMonitor {
                bank: eval_loader(train.clone(), cfg, &data.normalize, cfg.image_size)?,
                test: eval_loader(test, cfg, &data.normalize, cfg.image_size)?,
                classes,
            })
        }
        _ => None,
    };
    Trainer::new(cfg.clone(), method, loader, monitor, device)
}
