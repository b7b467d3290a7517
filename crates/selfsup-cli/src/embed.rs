//! `selfsup embed`: a dataset's features to `.safetensors` or `.npy`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use selfsup_data::Normalize;
use selfsup_eval::extract_features;
use selfsup_models::io;
use selfsup_train::parse_device;

use crate::{data::*, encoder::*, set_threads};

#[derive(Args)]
pub(crate) struct EmbedArgs {
    #[command(flatten)]
    pub(crate) ck: CheckpointArgs,
    /// cifar10-train, cifar10-test or folder:PATH.
    #[arg(long)]
    pub(crate) data: String,
    /// Output file: .safetensors (embeddings + labels) or .npy (embeddings).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn embed(a: &EmbedArgs) -> Result<()> {
    set_threads(a.ck.threads);
    let device = parse_device(&a.ck.device)?;
    if a.ck.recalibrate_bn {
        bail!("--recalibrate-bn applies to `selfsup eval` (knn, linear, low-label's probe); recalibrate in training with --bn-recalibrate true");
    }
    let (enc, cfg) = load_encoder(&a.ck, &device)?;
    let (ds, size, norm) = match a.data.as_str() {
        "cifar10-train" | "cifar10-test" => {
            let (src, sha) = cfg
                .as_ref()
                .map(|c| (c.source.clone(), c.sha256.clone()))
                .unwrap_or_default();
            let (tr, te) = load_cifar(&a.ck.data_dir, &src, &sha)?;
            (
                if a.data == "cifar10-train" { tr } else { te },
                32,
                Normalize::cifar10(),
            )
        }
        d if d.starts_with("folder:") => {
            let size = cfg.as_ref().map(|c| c.image_size).unwrap_or(32);
            (
                load_folder(&d["folder:".len()..], size)?,
                size,
                Normalize::imagenet(),
            )
        }
        d => bail!("unknown --data {d:?} (cifar10-train, cifar10-test, folder:PATH)"),
    };
    let enc = for_inference(enc, &a.ck, &cfg, &norm);
    let f = extract_features(
        enc.as_ref(),
        &eval_loader(ds, size, norm, a.ck.threads)?,
        &device,
    )?;
    // Never into a checkpoint or a run folder: `--out RUN/checkpoint/encoder.safetensors`
    // replaced the weights it was computed from.
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if parent.join("state.json").exists() || parent.join("metrics.jsonl").exists() {
        bail!(
            "--out {} is inside a run or checkpoint folder; write embeddings elsewhere",
            a.out.display()
        );
    }
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => {
            let mut m = std::collections::HashMap::new();
            m.insert("embeddings".to_string(), f.x.clone());
            if let Some(l) = &f.labels {
                m.insert(
                    "labels".to_string(),
                    Tensor::from_vec(
                        l.iter().map(|&x| x as u32).collect::<Vec<_>>(),
                        l.len(),
                        &Device::Cpu,
                    )?,
                );
            }
            io::save_tensors(&m, &a.out)?;
        }
        "npy" => {
            io::write_atomic_with(&a.out, |tmp| {
                f.x.write_npy(tmp).map_err(std::io::Error::other)
            })?;
        }
        _ => bail!(
            "--out must end in .safetensors or .npy, got {}",
            a.out.display()
        ),
    }
    println!(
        "wrote {} embeddings of dimension {} to {}",
        f.x.dim(0)?,
        f.x.dim(1)?,
        a.out.display()
    );
    Ok(())
}
