//! Checkpoints: a folder written whole and swapped in atomically.
//!
//! `RUN/checkpoint/` holds `model.safetensors` (every variable, method names),
//! `encoder.safetensors` (the encoder alone, torchvision names), `optimizer.safetensors`,
//! `state.json` and `config.toml` (the effective configuration). It is written as
//! `RUN/.checkpoint.tmp`, then the old folder is renamed to `RUN/checkpoint.old`, the new one
//! into place, and the old one removed; [`latest`] falls back to `checkpoint.old` if a crash hit
//! between the two renames.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the run stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimiser steps taken.
    pub step: u64,
    /// Method name.
    pub method: String,
    /// Encoder name.
    pub encoder: String,
    /// Encoder feature dimension.
    pub feature_dim: usize,
    /// Last kNN top-1, if measured.
    pub knn_top1: Option<f64>,
    /// Data-parallel ranks the run trained with (1: one process).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// Folder name of the current checkpoint.
pub const DIR: &str = "checkpoint";

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a checkpoint into `run`.
pub fn save(
    run: &Path,
    model: &HashMap<String, Tensor>,
    encoder: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainState,
    config_toml: &str,
) -> Result<PathBuf> {
    let tmp = run.join(".checkpoint.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let st = |m: &HashMap<String, Tensor>, name: &str| -> Result<()> {
        let p = tmp.join(name);
        candle_core::safetensors::save(m, &p)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", p.display())))
    };
    st(model, "model.safetensors")?;
    st(encoder, "encoder.safetensors")?;
    if optimizer.is_empty() {
        // safetensors cannot hold zero tensors everywhere; keep a marker.
        let mut m = HashMap::new();
        m.insert(
            "__empty__".to_string(),
            Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?,
        );
        st(&m, "optimizer.safetensors")?;
    } else {
        st(optimizer, "optimizer.safetensors")?;
    }
    let sp = tmp.join("state.json");
    std::fs::write(
        &sp,
        serde_json::to_string_pretty(state).expect("state serialises"),
    )
    .map_err(io(&sp))?;
    let cp = tmp.join("config.toml");
    std::fs::write(&cp, config_toml).map_err(io(&cp))?;
    let dest = run.join(DIR);
    let old = run.join("checkpoint.old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if dest.exists() {
        std::fs::rename(&dest, &old).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(dest)
}

/// The newest complete checkpoint folder of a run, if any.
pub fn latest(run: &Path) -> Option<PathBuf> {
    [run.join(DIR), run.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file() && d.join("model.safetensors").is_file())
}

/// Read `state.json` of a checkpoint folder.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join("state.json");
    let s = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&s).map_err(|e| Error::Checkpoint(format!("{}: {e}", p.display())))
}

/// Read a safetensors file of a checkpoint onto the CPU.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut m = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    m.remove("__empty__");
    Ok(m)
}

/// Resolve what `--checkpoint PATH` names: a run folder, a checkpoint folder, or an
/// `encoder.safetensors` / `model.safetensors` file; returns the checkpoint folder.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return path
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Checkpoint(format!("{}: no parent folder", path.display())));
    }
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path).ok_or_else(|| {
        Error::Checkpoint(format!(
            "{}: no checkpoint found (expected a run folder or RUN/checkpoint)",
            path.display()
        ))
    })
}
