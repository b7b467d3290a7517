//! `selfsup eval knn | linear | low-label`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use selfsup_eval::{knn, linear_probe, KnnConfig, LinearProbeConfig};
use selfsup_train::checkpoint;
use selfsup_train::record::Record;

use crate::{data::*, encoder::*};

#[derive(Subcommand)]
pub(crate) enum EvalCmd {
    /// Weighted kNN (cosine, k = 200, T = 0.1) with the training set as memory bank.
    Knn {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Neighbours.
        #[arg(long, default_value_t = 200)]
        k: usize,
        /// Vote temperature.
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
    },
    /// Linear probe on frozen features: top-1 and top-5.
    Linear {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Epochs over the features.
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        /// AdamW learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Also report kNN (k = 200, T = 0.1) on the same features (one extraction for both).
        #[arg(long)]
        knn: bool,
    },
    /// Low-label protocol: with 1% and 10% of the labels (balanced, seeded), a linear probe and
    /// fine-tuning of the pretrained encoder beside the same supervised training from scratch.
    LowLabel {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Fractions of the training labels.
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.1")]
        fractions: Vec<f64>,
        /// Supervised epochs over each subset (fine-tuning and scratch alike).
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// SGD learning rate.
        #[arg(long, default_value_t = 0.05)]
        lr: f64,
        /// Seed of the subsets and the training.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for the supervised runs.
        #[arg(long, default_value = "runs/low-label")]
        out: PathBuf,
    },
}

pub(crate) fn low_label(
    ck: &CheckpointArgs,
    ll: crate::lowlabel::LowLabel,
) -> Result<Vec<crate::lowlabel::Row>> {
    let (tr, te) = cifar_features(ck)?;
    let (train, test) = load_cifar(&ck.data_dir, "", "")?;
    let probe = ck.checkpoint.is_some().then_some((&tr, &te));
    crate::lowlabel::run(&ll, &train, &test, probe)
}

/// Where an evaluation's record goes: `--record`, else the run folder holding the checkpoint.
fn record_path(ck: &CheckpointArgs) -> Option<PathBuf> {
    if let Some(p) = &ck.record {
        return Some(p.clone());
    }
    let files = checkpoint::encoder_files(ck.checkpoint.as_ref()?).ok()?;
    let run = files.dir.parent()?;
    (run.join("config.toml").is_file() && run.join(checkpoint::DIR).exists())
        .then(|| run.join(selfsup_train::record::FILE))
}

/// A record of this evaluation, started now: what was evaluated (checkpoint and weights
/// digest, or baseline) and with which settings.
fn start_record(kind: &str, ck: &CheckpointArgs, settings: serde_json::Value) -> Record {
    let mut config = serde_json::json!({
        "baseline": ck.baseline, "encoder": ck.encoder, "input": ck.input, "tta": ck.tta, "device": ck.device,
        "recalibrate_bn": ck.recalibrate_bn, "settings": settings,
    });
    if let Some(p) = &ck.checkpoint {
        config["checkpoint"] = serde_json::json!(std::path::absolute(p).unwrap_or(p.clone()));
        if let Ok(files) = checkpoint::encoder_files(p) {
            config["weights"] = serde_json::json!(files.weights);
            config["weights_sha256"] =
                serde_json::json!(selfsup_data::fingerprint::file_sha256(&files.weights).ok());
            if ck.encoder.is_none() {
                config["encoder"] = serde_json::json!(files.config.map(|c| c.encoder));
            }
        }
    }
    Record::start(
        kind,
        crate::build_info(),
        config,
        dataset_id("cifar10", &ck.data_dir),
        1,
    )
}

/// Finish and append `record` where [`record_path`] says (and say where).
fn save_record(mut record: Record, ck: &CheckpointArgs, results: serde_json::Value) -> Result<()> {
    record.finish("done", results);
    if let Some(path) = record_path(ck) {
        record.append(&path)?;
        tracing::info!("recorded in {}", path.display());
    }
    Ok(())
}

pub(crate) fn eval(e: &EvalCmd) -> Result<()> {
    match e {
        EvalCmd::LowLabel {
            ck,
            fractions,
            epochs,
            batch_size,
            lr,
            seed,
            out,
        } => {
            // Settings that would fail later fail now, before any feature or training.
            if let Some(f) = fractions.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
                bail!("--fractions: {f} is not in (0, 1]");
            }
            if *epochs == 0 || *batch_size < 2 || !(lr.is_finite() && *lr > 0.0) {
                bail!("low-label needs --epochs > 0, --batch-size >= 2 and --lr > 0, got {epochs}, {batch_size}, {lr}");
            }
            let record = start_record(
                "eval low-label",
                ck,
                serde_json::json!({"fractions": fractions, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "out": out}),
            );
            let (encoder, weights) = match &ck.checkpoint {
                Some(p) => {
                    let files = checkpoint::encoder_files(p)?;
                    let enc = files.encoder_name(ck.encoder.as_deref())?;
                    (enc, Some(files.weights))
                }
                None => (
                    ck.encoder.clone().unwrap_or_else(|| "small-cnn".into()),
                    None,
                ),
            };
            let ll = crate::lowlabel::LowLabel {
                encoder,
                weights,
                fractions: fractions.clone(),
                epochs: *epochs,
                batch_size: *batch_size,
                lr: *lr,
                seed: *seed,
                threads: ck.threads,
                device: ck.device.clone(),
                out: out.clone(),
            };
            let rows = low_label(ck, ll)?;
            let results = serde_json::json!(rows);
            // The table's folder keeps the record too.
            let mut beside = record.clone();
            beside.finish("done", results.clone());
            beside.append(&out.join(selfsup_train::record::FILE))?;
            save_record(record, ck, results)?;
        }
        EvalCmd::Knn { ck, k, temperature } => {
            let cfg = KnnConfig {
                k: *k,
                temperature: *temperature,
            };
            cfg.validate()?;
            let record = start_record(
                "eval knn",
                ck,
                serde_json::json!({"k": k, "temperature": temperature}),
            );
            let (tr, te) = cifar_features(ck)?;
            let (t1, t5) = knn(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                cfg,
            )?;
            println!(
                "kNN (k={k}, T={temperature}) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}%",
                100.0 * t1,
                100.0 * t5
            );
            save_record(record, ck, serde_json::json!({"top1": t1, "top5": t5}))?;
        }
        EvalCmd::Linear {
            ck,
            epochs,
            lr,
            knn: with_knn,
        } => {
            let probe = LinearProbeConfig {
                epochs: *epochs,
                lr: *lr,
                ..Default::default()
            };
            probe.validate()?;
            let record = start_record(
                "eval linear",
                ck,
                serde_json::json!({"probe": format!("{probe:?}"), "knn": with_knn}),
            );
            let (tr, te) = cifar_features(ck)?;
            let mut results = serde_json::Map::new();
            if *with_knn {
                let (t1, t5) = knn(
                    &tr.x,
                    tr.labels.as_ref().unwrap(),
                    &te.x,
                    te.labels.as_ref().unwrap(),
                    10,
                    KnnConfig::default(),
                )?;
                println!(
                    "kNN (k=200, T=0.1) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}%",
                    100.0 * t1,
                    100.0 * t5
                );
                results.insert("knn".into(), serde_json::json!({"top1": t1, "top5": t5}));
            }
            let r = linear_probe(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                &probe,
            )?;
            println!("linear probe ({epochs} epochs) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}% (train top-1 {:.2}%)", 100.0 * r.top1, 100.0 * r.top5, 100.0 * r.train_top1);
            results.insert(
                "linear".into(),
                serde_json::json!({"top1": r.top1, "top5": r.top5, "train_top1": r.train_top1}),
            );
            save_record(record, ck, results.into())?;
        }
    }
    Ok(())
}
