//! `selfsup train`'s options and how they merge: preset, then the method's defaults, then the
//! TOML file, then the flags (a resumed run: its own saved configuration).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use selfsup_models::EncoderKind;
use selfsup_train::setup::check_method_name;
use selfsup_train::{checkpoint, TrainConfig};

use crate::train::*;

#[derive(Args, Default)]
pub(crate) struct TrainArgs {
    /// Method: simclr, moco, byol, simsiam, barlow, vicreg, pairs, rotation, colorization; a
    /// hybrid such as simclr+rotation (contrastive + pretext, see --aux-weight); or, using the
    /// labels: supcon, supervised (and pairs with --pair-labels). Each sets its own defaults
    /// (temperature, head widths, momentum, augmentation), see docs/methods.md.
    #[arg(long)]
    pub(crate) method: Option<String>,
    /// Encoder: small-cnn, resnet18, resnet34, resnet50 (-cifar / -imagenet stem, -wN width), convnet-seed.
    #[arg(long)]
    pub(crate) encoder: Option<String>,
    /// cifar10 or folder:PATH (root/<class>/*.png for labels, or a flat folder).
    #[arg(long)]
    pub(crate) dataset: Option<String>,
    /// Where CIFAR-10 is (or is downloaded to).
    #[arg(long)]
    pub(crate) data_dir: Option<String>,
    /// CIFAR-10 archive URL or path for the first-use download (or $SELFSUP_CIFAR10_SOURCE).
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// sha256 of --source.
    #[arg(long)]
    pub(crate) sha256: Option<String>,
    /// Epochs.
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Images per batch (two views each).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// sgd, adamw or lars.
    #[arg(long)]
    pub(crate) optimizer: Option<String>,
    /// Weight decay.
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Warmup epochs.
    #[arg(long)]
    pub(crate) warmup_epochs: Option<f64>,
    /// Loss temperature (simclr, moco, supcon).
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    /// Augmentation: simclr_cifar, simclr_imagenet, byol, crop_flip, none.
    #[arg(long)]
    pub(crate) augment: Option<String>,
    /// Projection head hidden width.
    #[arg(long)]
    pub(crate) proj_hidden: Option<usize>,
    /// Projection output width.
    #[arg(long)]
    pub(crate) proj_out: Option<usize>,
    /// Predictor hidden width (byol, simsiam).
    #[arg(long)]
    pub(crate) pred_hidden: Option<usize>,
    /// Target-network momentum at the start (moco, byol).
    #[arg(long)]
    pub(crate) momentum_tau: Option<f64>,
    /// Cosine schedule of the target momentum up to 1 (byol's default; true or false).
    #[arg(long)]
    pub(crate) momentum_cosine: Option<bool>,
    /// MoCo queue size (keys).
    #[arg(long)]
    pub(crate) queue_size: Option<usize>,
    /// MoCo symmetric loss (true or false).
    #[arg(long)]
    pub(crate) symmetric: Option<bool>,
    /// Weight of the pretext loss in a hybrid (simclr+rotation).
    #[arg(long)]
    pub(crate) aux_weight: Option<f64>,
    /// pairs: margin or triplet.
    #[arg(long)]
    pub(crate) pair_loss: Option<String>,
    /// pairs: margin of the loss.
    #[arg(long)]
    pub(crate) margin: Option<f64>,
    /// pairs: positives/negatives from labels too (uses labels; true or false).
    #[arg(long)]
    pub(crate) pair_labels: Option<bool>,
    /// colorization: bins (default, 16 per channel), bins:Q or regression.
    #[arg(long)]
    pub(crate) color_target: Option<String>,
    /// Seed for weights, data order and augmentations.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Threads per rank (0: the cores shared by the ranks on this machine).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Data-parallel ranks as threads of this process (1: none): each trains on batch / ranks
    /// images with its own threads, as under mpirun, without MPI. 0: one rank per --threads
    /// cores (per core by default; needs --sync-bn; 1 under mpirun).
    #[arg(long)]
    pub(crate) ranks: Option<usize>,
    /// cpu or cuda:N.
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// Run folder.
    #[arg(long)]
    pub(crate) out: Option<String>,
    /// Train on the first N images only.
    #[arg(long)]
    pub(crate) train_subset: Option<usize>,
    /// kNN monitor every N epochs (0: off).
    #[arg(long)]
    pub(crate) knn_every: Option<usize>,
    /// kNN monitor on flip-averaged features (each image and its mirror image).
    #[arg(long)]
    pub(crate) knn_flip: Option<bool>,
    /// Test-time augmentation of the final kNN evaluation (after the last epoch), the
    /// periodic ones as `--knn-flip` says: `none`, `flip` (each image and its mirror image) or
    /// `flip-shift` (both, each also shifted one pixel down-right and up-left: six views), as
    /// `selfsup eval knn --tta`.
    #[arg(long, value_parser = ["none", "flip", "flip-shift"])]
    pub(crate) knn_final_tta: Option<String>,
    /// After the last epoch, re-estimate the encoder's BatchNorm statistics on whole training
    /// images before the final kNN evaluation and checkpoint (precise BatchNorm).
    #[arg(long)]
    pub(crate) bn_recalibrate: Option<bool>,
    /// Start the encoder's first convolution from patch-whitening filters of the training
    /// images (a fresh run).
    #[arg(long)]
    pub(crate) patch_whitening: Option<bool>,
    /// Wall-clock budget of a fresh run ("1h", "55m", "3600s"; "0s": off): after the first
    /// epoch the run fits its length, at most --epochs, to end inside it, and refits it after
    /// every later epoch.
    #[arg(long, value_parser = parse_budget)]
    pub(crate) time_budget: Option<f64>,
    /// Side of the global training views (default: the image size); evaluation sees whole
    /// images at the image size.
    #[arg(long)]
    pub(crate) crop_size: Option<usize>,
    /// Smallest area of a global view's crop (fraction of the image; default 0.08).
    #[arg(long)]
    pub(crate) crop_min_scale: Option<f64>,
    /// Colour jitter strengths of the views times this factor (1: the augmentation's own, 0:
    /// none, at most 5).
    #[arg(long)]
    pub(crate) jitter_scale: Option<f64>,
    /// Multi-crop: local views per image besides the two global ones (simclr, barlow, vicreg).
    #[arg(long)]
    pub(crate) local_crops: Option<usize>,
    /// Side of a local view in pixels.
    #[arg(long)]
    pub(crate) local_crop_size: Option<usize>,
    /// Smallest area of a local crop (fraction of the image).
    #[arg(long)]
    pub(crate) local_crop_min_scale: Option<f64>,
    /// Largest area of a local crop (fraction of the image).
    #[arg(long)]
    pub(crate) local_crop_max_scale: Option<f64>,
    /// TOML config file.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Preset: cifar10-cpu, cifar10-cpu-1h or cifar10-gpu.
    #[arg(long)]
    pub(crate) preset: Option<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Stop after this many epochs of this call, checkpointed and resumable with --resume (for
    /// a cluster's time limit); the schedule stays that of --epochs.
    #[arg(long)]
    pub(crate) stop_after: Option<usize>,
    /// Data-parallel world: auto (MPI when started by mpirun / srun), single, or mpi.
    /// --batch-size stays the global batch; each rank takes batch / ranks images.
    #[arg(long, default_value = "auto")]
    pub(crate) dist: String,
    /// Data-parallel runs: BatchNorm statistics over the global batch (SyncBatchNorm).
    #[arg(long)]
    pub(crate) sync_bn: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
}

pub(crate) fn effective_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::default();
    if let Some(p) = &a.preset {
        cfg = crate::presets::preset(p)?;
    }
    let file = match &a.config {
        Some(path) => Some((
            path,
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => None,
    };
    // The method's own defaults go under the config file and the flags.
    let file_method = file.as_ref().and_then(|(_, s)| {
        toml::from_str::<toml::Table>(s)
            .ok()
            .and_then(|t| t.get("method").and_then(|m| m.as_str().map(String::from)))
    });
    let method = a
        .method
        .clone()
        .or(file_method)
        .unwrap_or_else(|| cfg.method.clone());
    check_method_name(&method)?;
    // A preset's own method keeps the preset's settings (they are its recipe); another method
    // brings its defaults.
    if a.preset.is_none() || method != cfg.method {
        cfg.apply_method_defaults(&method);
    }
    // The learning rate (and its batch) that a batch size chosen below scales.
    let default_lr = (cfg.lr, cfg.batch_size);
    if let Some((path, s)) = &file {
        cfg = merge_toml(&cfg, s).with_context(|| format!("{}", path.display()))?;
    }
    if a.resume {
        // The run's own configuration (or its checkpoint's), not the preset's or the file's;
        // flags that would make it another run are refused.
        let out = a.out.clone().unwrap_or_else(|| cfg.out.clone());
        let run = Path::new(&out);
        let candidates = [
            Some(run.join("config.toml")),
            checkpoint::latest(run).map(|d| d.join("config.toml")),
        ];
        if let Some((path, s)) = candidates
            .into_iter()
            .flatten()
            .find_map(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)))
        {
            cfg = TrainConfig::from_toml(&s).with_context(|| format!("{}", path.display()))?;
            let differs = |flag: &str, given: Option<String>, saved: String| -> Result<()> {
                match given {
                    Some(g) if g != saved => bail!(
                        "--resume: --{flag} {g} is not the run's {saved} ({}); another {flag} is a new run",
                        path.display()
                    ),
                    _ => Ok(()),
                }
            };
            differs("method", a.method.clone(), cfg.method.clone())?;
            differs("encoder", a.encoder.clone(), cfg.encoder.clone())?;
            differs(
                "dataset",
                a.dataset.as_deref().map(absolute_dataset).transpose()?,
                absolute_dataset(&cfg.dataset)?,
            )?;
            differs(
                "batch-size",
                a.batch_size.map(|v| v.to_string()),
                cfg.batch_size.to_string(),
            )?;
            differs("seed", a.seed.map(|v| v.to_string()), cfg.seed.to_string())?;
        }
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { cfg.$f = v.clone().into(); } )* };
    }
    set!(
        method,
        encoder,
        dataset,
        data_dir,
        source,
        sha256,
        epochs,
        batch_size,
        lr,
        weight_decay,
        warmup_epochs,
        temperature,
        seed,
        threads,
        ranks,
        device,
        out,
        train_subset,
        knn_every,
        knn_flip,
        knn_final_tta,
        bn_recalibrate,
        patch_whitening,
        crop_size,
        crop_min_scale,
        jitter_scale,
        local_crops,
        local_crop_size,
        local_crop_min_scale,
        local_crop_max_scale,
        augment,
        proj_hidden,
        proj_out,
        pred_hidden,
        momentum_tau,
        momentum_cosine,
        queue_size,
        symmetric,
        aux_weight,
        pair_loss,
        margin,
        pair_labels,
        color_target
    );
    if let Some(o) = &a.optimizer {
        cfg.optimizer = o.parse()?;
    }
    // A learning rate that scales with the batch follows a batch size given after the method's
    // defaults, unless a learning rate was given too.
    let file_sets = |key: &str| {
        file.as_ref().is_some_and(|(_, s)| {
            toml::from_str::<toml::Table>(s).is_ok_and(|t| t.contains_key(key))
        })
    };
    if !a.resume && a.lr.is_none() && !file_sets("lr") {
        cfg.rescale_default_lr(default_lr.0, default_lr.1);
    }
    if a.sync_bn {
        cfg.sync_bn = true;
    }
    if let Some(b) = a.time_budget {
        cfg.time_budget_s = b;
    }
    cfg.validate()?;
    check_method_name(&cfg.method)?;
    cfg.encoder.parse::<EncoderKind>()?;
    Ok(cfg)
}

/// `--time-budget`: a duration ("1h", "55m 30s", "3600s") in seconds.
fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("{e} (a duration such as 1h, 55m or 3600s)"))
}

/// Apply the keys of a TOML document over `base`.
pub(crate) fn merge_toml(base: &TrainConfig, s: &str) -> Result<TrainConfig> {
    let mut v: toml::Table = toml::from_str(&base.to_toml())?;
    let over: toml::Table = toml::from_str(s).context("not valid TOML")?;
    for (k, x) in over {
        v.insert(k, x);
    }
    Ok(TrainConfig::from_toml(&toml::to_string(&v)?)?)
}
