//! `selfsup eval low-label`: classification with 1% / 10% of the labels, pretrained vs scratch.
//!
//! For each fraction, a class-balanced seeded subset of the training labels is used three ways:
//! a linear probe on the pretrained encoder's frozen features, fine-tuning the pretrained encoder
//! with a linear classifier, and the same supervised training from a random initialisation with
//! the same budget (epochs, batch size, learning rate, augmentation). All are scored top-1 on
//! the full CIFAR-10 test set.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use selfsup_data::{InMemory, Normalize};
use selfsup_eval::{balanced_subset, extract_features, linear_probe, LinearProbeConfig};
use selfsup_methods::{Method, Placement, Supervised, CLASSIFIER_PREFIX, ENCODER_PREFIX};
use selfsup_models::EncoderKind;
use selfsup_train::optim::OptimizerKind;
use selfsup_train::setup::{build_trainer_with, RunData};
use selfsup_train::TrainConfig;

/// Settings of one low-label evaluation.
pub struct LowLabel {
    /// Encoder name.
    pub encoder: String,
    /// Pretrained encoder weights (torchvision names), if any.
    pub weights: Option<PathBuf>,
    /// Fractions of the training labels.
    pub fractions: Vec<f64>,
    /// Supervised epochs over the subset.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// Seed of the subsets and the training.
    pub seed: u64,
    /// Threads.
    pub threads: usize,
    /// Device.
    pub device: String,
    /// Folder for the supervised runs.
    pub out: PathBuf,
}

/// One row of the table (accuracies as fractions; `None`: not applicable).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// Fraction of the training labels.
    pub fraction: f64,
    /// Labelled images used.
    pub images: usize,
    /// Linear probe on the pretrained encoder.
    pub probe_top1: Option<f64>,
    /// Fine-tuned pretrained encoder.
    pub finetune_top1: Option<f64>,
    /// Trained from scratch.
    pub scratch_top1: f64,
}

fn top1(method: &dyn Method, test: &selfsup_eval::Features) -> Result<f64> {
    let data = method.varmap().data().lock().unwrap();
    let w = data[&format!("{CLASSIFIER_PREFIX}layers.0.weight")]
        .as_tensor()
        .to_device(&Device::Cpu)?;
    let b = data[&format!("{CLASSIFIER_PREFIX}layers.0.bias")]
        .as_tensor()
        .to_device(&Device::Cpu)?;
    let logits: Vec<Vec<f32>> = test.x.matmul(&w.t()?)?.broadcast_add(&b)?.to_vec2()?;
    let labels = test.labels.as_ref().context("test labels")?;
    // Scored like every other accuracy (a tie is not a hit).
    Ok(selfsup_eval::topk_accuracy(&logits, labels).0)
}

fn supervised(
    ll: &LowLabel,
    train: &InMemory,
    test: &InMemory,
    pretrained: bool,
    tag: &str,
) -> Result<f64> {
    let device = selfsup_train::parse_device(&ll.device)?;
    let kind: EncoderKind = ll.encoder.parse()?;
    let method = Supervised::new(
        &kind,
        10,
        ll.seed,
        &Placement::new(device.clone(), DType::F32),
    )?;
    if pretrained {
        let w = ll.weights.as_ref().context("no pretrained weights")?;
        selfsup_models::io::load_varmap(method.varmap(), ENCODER_PREFIX, w)?;
    }
    let out = ll.out.join(tag);
    if out.exists() {
        // Only a run folder of an earlier low-label evaluation is replaced, and it is said.
        crate::train::ensure_run_folder(&out)?;
        tracing::warn!("replacing the earlier low-label run in {}", out.display());
        std::fs::remove_dir_all(&out)?;
    }
    let cfg = TrainConfig {
        method: "supervised".into(),
        encoder: ll.encoder.clone(),
        augment: "crop_flip".into(),
        epochs: ll.epochs,
        batch_size: ll.batch_size.min(train.pixels.len() / 3072).max(2),
        lr: ll.lr,
        optimizer: OptimizerKind::Sgd,
        weight_decay: 5e-4,
        warmup_epochs: 0.0,
        knn_every: 0,
        seed: ll.seed,
        threads: ll.threads,
        device: ll.device.clone(),
        out: out.to_string_lossy().into_owned(),
        log_every: 50,
        ..Default::default()
    };
    let data = RunData {
        train: Arc::new(train.clone()),
        test: None,
        normalize: Normalize::cifar10(),
    };
    let mut t = build_trainer_with(&cfg, data, Box::new(method))?;
    t.fit(None)?;
    let loader = crate::data::eval_loader(test.clone(), 32, Normalize::cifar10(), ll.threads)?;
    let feats = extract_features(t.method().encoder(), &loader, &device)?;
    top1(t.method(), &feats)
}

/// Run the protocol; prints a Markdown table and returns its rows.
pub fn run(
    ll: &LowLabel,
    train: &InMemory,
    test: &InMemory,
    probe_features: Option<(&selfsup_eval::Features, &selfsup_eval::Features)>,
) -> Result<Vec<Row>> {
    let labels = train.label_vec().context("CIFAR-10 train labels")?;
    let mut table = String::from(
        "| labels | linear probe (pretrained) | fine-tune (pretrained) | from scratch |\n| --- | --- | --- | --- |\n",
    );
    print!("{table}");
    // The table so far is also kept in OUT/results.md (rewritten atomically after each row),
    // so an interrupted run keeps its finished rows.
    let results = ll.out.join("results.md");
    std::fs::create_dir_all(&ll.out).with_context(|| format!("{}", ll.out.display()))?;
    let mut rows = Vec::new();
    for &f in &ll.fractions {
        let idx = balanced_subset(&labels, f, ll.seed);
        let sub = train.subset(&idx);
        let probe = match probe_features {
            Some((tr, te)) => {
                let ids = Tensor::from_vec(
                    idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    idx.len(),
                    &Device::Cpu,
                )?;
                let x = tr.x.index_select(&ids, 0)?;
                let y: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
                let r = linear_probe(
                    &x,
                    &y,
                    &te.x,
                    te.labels.as_ref().context("test labels")?,
                    10,
                    &LinearProbeConfig {
                        seed: ll.seed,
                        ..Default::default()
                    },
                )?;
                Some(r.top1)
            }
            None => None,
        };
        let pct = format!("{}", f * 100.0);
        let ft = if ll.weights.is_some() {
            Some(supervised(
                ll,
                &sub,
                test,
                true,
                &format!("finetune-{pct}pct"),
            )?)
        } else {
            None
        };
        let scratch = supervised(ll, &sub, test, false, &format!("scratch-{pct}pct"))?;
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        rows.push(Row {
            fraction: f,
            images: idx.len(),
            probe_top1: probe,
            finetune_top1: ft,
            scratch_top1: scratch,
        });
        let (probe, ft) = (cell(probe), cell(ft));
        let row = format!(
            "| {pct}% ({} images) | {probe} | {ft} | {:.2}% |\n",
            idx.len(),
            100.0 * scratch
        );
        print!("{row}");
        table.push_str(&row);
        selfsup_train::write_atomic(&results, table.as_bytes())?;
    }
    Ok(rows)
}
