//! `--checkpoint` / `--baseline`: the frozen encoder that eval, embed and neighbors use.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use selfsup_data::Normalize;
use selfsup_eval::{extract_features_tta, Tta};
use selfsup_methods::GreyInput;
use selfsup_models::{build_encoder, io, seeded_var_builder, Encoder, EncoderKind};
use selfsup_train::setup::inference_encoder;
use selfsup_train::{checkpoint, parse_device, TrainConfig};

use crate::{data::*, set_threads};

#[derive(Args)]
pub(crate) struct CheckpointArgs {
    /// Run folder, checkpoint folder, or encoder.safetensors.
    #[arg(long, required_unless_present = "baseline")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Evaluate a baseline instead of a checkpoint: `random` (a freshly initialised --encoder,
    /// seed 0) or `pixels` (the normalised pixels themselves as features).
    #[arg(long, conflicts_with = "checkpoint")]
    pub(crate) baseline: Option<String>,
    /// Encoder name, when the checkpoint has no config.toml beside it.
    #[arg(long)]
    pub(crate) encoder: Option<String>,
    /// Where CIFAR-10 is.
    #[arg(long, default_value = "data")]
    pub(crate) data_dir: String,
    /// Append the evaluation's record (build, command, weights digest, dataset, machine, wall
    /// time, results) to this JSONL file; default: RUN/record.jsonl when --checkpoint is in a
    /// run folder.
    #[arg(long)]
    pub(crate) record: Option<PathBuf>,
    /// Threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// What the encoder is fed: `auto` (the input it trained on: grey images for a
    /// colorization run, colour for every other), `colour`, or `grey` (CIELAB lightness on
    /// three channels, as colorization trains on; e.g. `--baseline random --input grey`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "colour", "grey"])]
    pub(crate) input: String,
    /// Test-time augmentation of the features, bank and queries alike: `none` (the standard
    /// protocol), `flip` (the mean of the features of each image and its mirror image) or
    /// `flip-shift` (the mean over six views: the image and its mirror image, each as it is
    /// and shifted one pixel down-right and one up-left, edges repeated).
    #[arg(long, default_value = "none", value_parser = ["none", "flip", "flip-shift"])]
    pub(crate) tta: String,
    /// Before extracting features, re-estimate the encoder's BatchNorm statistics on the whole
    /// training images (precise BatchNorm, as `train --bn-recalibrate true` does after the last
    /// epoch; in memory only, the checkpoint is not changed).
    #[arg(long)]
    pub(crate) recalibrate_bn: bool,
}

/// Raw pixels as features: `(N, C, H, W) -> (N, C H W)`.
pub(crate) struct Pixels;

impl Encoder for Pixels {
    fn forward_t(&self, x: &Tensor, _train: bool) -> selfsup_models::Result<Tensor> {
        Ok(x.flatten_from(1)?)
    }
    fn feature_dim(&self) -> usize {
        3 * 32 * 32
    }
}

/// The encoder of a checkpoint as feature consumers call it, on images normalised with `norm`:
/// `--input auto` puts a grey input in front for a colorization run (the only input it
/// trained on); `colour` / `grey` choose for any encoder.
pub(crate) fn for_inference(
    enc: Box<dyn Encoder>,
    ck: &CheckpointArgs,
    cfg: &Option<TrainConfig>,
    norm: &Normalize,
) -> Box<dyn Encoder> {
    match (ck.input.as_str(), cfg) {
        ("grey", _) => Box::new(GreyInput::new(enc, norm.mean, norm.std)),
        ("auto", Some(c)) => inference_encoder(c, enc, norm),
        _ => enc,
    }
}

/// The encoder of a checkpoint (or a baseline), with its config when there is one.
pub(crate) fn load_encoder(
    ck: &CheckpointArgs,
    device: &Device,
) -> Result<(Box<dyn Encoder>, Option<TrainConfig>)> {
    match ck.baseline.as_deref() {
        Some("pixels") => return Ok((Box::new(Pixels), None)),
        Some("random") => {
            let name = ck.encoder.clone().unwrap_or_else(|| "small-cnn".into());
            let vm = candle_nn::VarMap::new();
            let enc = build_encoder(
                &name.parse()?,
                seeded_var_builder(&vm, 0, DType::F32, device),
            )?;
            return Ok((enc, None));
        }
        Some(b) => bail!("unknown baseline {b:?} (random or pixels)"),
        None => {}
    }
    let path = ck
        .checkpoint
        .clone()
        .expect("clap requires --checkpoint without --baseline");
    let files = checkpoint::encoder_files(&path)?;
    let name = files.encoder_name(ck.encoder.as_deref())?;
    let kind: EncoderKind = name.parse()?;
    let vm = candle_nn::VarMap::new();
    let enc = build_encoder(&kind, seeded_var_builder(&vm, 0, DType::F32, device))?;
    io::load_varmap(&vm, "", &files.weights)
        .with_context(|| format!("loading {} as {name}", files.weights.display()))?;
    Ok((enc, files.config))
}

pub(crate) fn cifar_features(
    ck: &CheckpointArgs,
) -> Result<(selfsup_eval::Features, selfsup_eval::Features)> {
    set_threads(ck.threads);
    let device = parse_device(&ck.device)?;
    let (enc, cfg) = load_encoder(ck, &device)?;
    let (src, sha) = cfg
        .as_ref()
        .map(|c| (c.source.clone(), c.sha256.clone()))
        .unwrap_or_default();
    let (train, test) = load_cifar(&ck.data_dir, &src, &sha)?;
    let enc = for_inference(enc, ck, &cfg, &Normalize::cifar10());
    if ck.recalibrate_bn {
        let n = recalibrate(enc.as_ref(), &train, ck.threads, &device)?;
        tracing::info!("BatchNorm statistics recalibrated on {n} training images");
    }
    let tta: Tta = ck.tta.parse()?;
    let tr = extract_features_tta(
        enc.as_ref(),
        &eval_loader(train, 32, Normalize::cifar10(), ck.threads)?,
        &device,
        tta,
    )?;
    let te = extract_features_tta(
        enc.as_ref(),
        &eval_loader(test, 32, Normalize::cifar10(), ck.threads)?,
        &device,
        tta,
    )?;
    Ok((tr, te))
}

/// Images per batch of `--recalibrate-bn`.
pub(crate) const RECALIBRATION_BATCH: usize = 512;

/// Precise BatchNorm over `train` (shuffled, seed 0, full batches of 512 images, or one batch
/// of all of them when there are fewer), as the trainer's `bn_recalibrate` does after the
/// last epoch: the number of images used.
pub(crate) fn recalibrate(
    enc: &dyn Encoder,
    train: &selfsup_data::InMemory,
    threads: usize,
    device: &Device,
) -> Result<usize> {
    let loader = selfsup_data::Loader::new(
        std::sync::Arc::new(train.clone()),
        selfsup_data::preset_views(selfsup_data::Preset::None, 32, Normalize::cifar10()),
        selfsup_data::LoaderConfig {
            batch_size: RECALIBRATION_BATCH
                .min(selfsup_data::Dataset::len(train))
                .max(1),
            shuffle: true,
            drop_last: true,
            seed: 0,
            threads,
            prefetch: 2,
            shard: (0, 1),
        },
    )?;
    Ok(selfsup_eval::recalibrate_batch_norm(
        enc, &loader, device, None,
    )?)
}
