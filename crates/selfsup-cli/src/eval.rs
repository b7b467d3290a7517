//! `selfsup eval knn | linear | low-label`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use selfsup_eval::{knn, linear_probe, KnnConfig, LinearProbeConfig};
use selfsup_train::checkpoint;

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

pub(crate) fn low_label(ck: &CheckpointArgs, ll: crate::lowlabel::LowLabel) -> Result<()> {
    let (tr, te) = cifar_features(ck)?;
    let (train, test) = load_cifar(&ck.data_dir, "", "")?;
    let probe = ck.checkpoint.is_some().then_some((&tr, &te));
    crate::lowlabel::run(&ll, &train, &test, probe)
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
            low_label(ck, ll)?;
        }
        EvalCmd::Knn { ck, k, temperature } => {
            let (tr, te) = cifar_features(ck)?;
            let (t1, t5) = knn(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                KnnConfig {
                    k: *k,
                    temperature: *temperature,
                },
            )?;
            println!(
                "kNN (k={k}, T={temperature}) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}%",
                100.0 * t1,
                100.0 * t5
            );
        }
        EvalCmd::Linear {
            ck,
            epochs,
            lr,
            knn: with_knn,
        } => {
            let (tr, te) = cifar_features(ck)?;
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
            }
            let r = linear_probe(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                &LinearProbeConfig {
                    epochs: *epochs,
                    lr: *lr,
                    ..Default::default()
                },
            )?;
            println!("linear probe ({epochs} epochs) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}% (train top-1 {:.2}%)", 100.0 * r.top1, 100.0 * r.top5, 100.0 * r.train_top1);
        }
    }
    Ok(())
}
