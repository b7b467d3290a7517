//! Checkpoints: a folder written whole, synced, verified, and swapped in so that a complete
//! checkpoint is never removed before its successor is complete and in place.
//!
//! `RUN/checkpoint/` holds `model.safetensors` (every variable, method names),
//! `encoder.safetensors` (the encoder alone, torchvision names), `optimizer.safetensors`,
//! `config.toml` (the effective configuration) and `state.json` (where the run stands, and the
//! size and SHA-256 of each `.safetensors` file). Saving:
//!
//! 1. finish an interrupted save first ([`recover`]): a complete `RUN/.checkpoint.tmp` newer than
//!    `checkpoint` takes its place, an incomplete one is removed;
//! 2. write every file into `RUN/.checkpoint.tmp`, `state.json` last, each fsync'd, then the
//!    folder;
//! 3. if `checkpoint` is complete: remove `checkpoint.old`, rename `checkpoint` to
//!    `checkpoint.old` (the fallback that stays); an incomplete `checkpoint` is removed instead;
//! 4. rename `.checkpoint.tmp` to `checkpoint`, fsync `RUN`.
//!
//! [`latest`] picks the newest of the three folders that verifies (files present with the
//! recorded sizes and digests), so a kill at any point, or twice in a row, leaves the newest
//! complete checkpoint usable, and after a power loss a folder of empty files is passed over
//! for the previous one.
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
    /// Size and SHA-256 of each `.safetensors` file of the checkpoint folder (absent in
    /// checkpoints written before it was recorded: those are trusted as they are).
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, FileDigest>,
}

/// What [`TrainState::files`] records of a file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Bytes.
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
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

/// Where a save can be interrupted (for the crash tests): [`save_with`] calls its hook before
/// each step, and a hook that returns `Err` stops the save there, as a kill would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveStep {
    /// Before the interrupted save of an earlier run is finished or cleared.
    Recover,
    /// Before writing the named file into the temporary folder.
    Write(&'static str),
    /// Before syncing the temporary folder.
    SyncTmp,
    /// Before removing `checkpoint.old`.
    RemoveOld,
    /// Before renaming `checkpoint` to `checkpoint.old`.
    RetireCurrent,
    /// Before renaming the temporary folder to `checkpoint`.
    Install,
    /// Before syncing the run folder.
    SyncRun,
}

const FILES: [&str; 4] = [
    "model.safetensors",
    "encoder.safetensors",
    "optimizer.safetensors",
    "config.toml",
];

const TMP: &str = ".checkpoint.tmp";
const OLD: &str = "checkpoint.old";

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Flush a written file to disk and digest what it holds.
fn sync_file(path: &Path) -> Result<FileDigest> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))?;
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(FileDigest {
        bytes: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileDigest> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(FileDigest {
        bytes: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
    })
}

use sha2::Digest;

/// Write a checkpoint into `run`.
pub fn save(
    run: &Path,
    model: &HashMap<String, Tensor>,
    encoder: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainState,
    config_toml: &str,
) -> Result<PathBuf> {
    save_with(
        run,
        model,
        encoder,
        optimizer,
        state,
        config_toml,
        &mut |_| Ok(()),
    )
}

/// [`save`], calling `hook` before every step (see [`SaveStep`]).
pub fn save_with(
    run: &Path,
    model: &HashMap<String, Tensor>,
    encoder: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainState,
    config_toml: &str,
    hook: &mut dyn FnMut(SaveStep) -> Result<()>,
) -> Result<PathBuf> {
    hook(SaveStep::Recover)?;
    recover(run)?;
    let tmp = run.join(TMP);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut st = state.clone();
    st.files.clear();
    for name in FILES {
        hook(SaveStep::Write(name))?;
        let p = tmp.join(name);
        let tensors = match name {
            "model.safetensors" => Some(model),
            "encoder.safetensors" => Some(encoder),
            "optimizer.safetensors" => Some(optimizer),
            _ => None,
        };
        let d = match tensors {
            Some(m) => {
                let mut m = m.clone();
                if m.is_empty() {
                    // safetensors cannot hold zero tensors everywhere; keep a marker.
                    m.insert(
                        "__empty__".to_string(),
                        Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?,
                    );
                }
                candle_core::safetensors::save(&m, &p)
                    .map_err(|e| Error::Checkpoint(format!("{}: {e}", p.display())))?;
                sync_file(&p)?
            }
            None => {
                // A record for people (editable), not verified.
                write_synced(&p, config_toml.as_bytes())?;
                continue;
            }
        };
        st.files.insert(name.to_string(), d);
    }
    hook(SaveStep::Write("state.json"))?;
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&st)
            .expect("state serialises")
            .as_bytes(),
    )?;
    hook(SaveStep::SyncTmp)?;
    sync_dir(&tmp)?;
    install(run, hook)
}

/// Steps 3 and 4: the complete temporary folder becomes `checkpoint`, a complete `checkpoint`
/// becomes `checkpoint.old`.
fn install(run: &Path, hook: &mut dyn FnMut(SaveStep) -> Result<()>) -> Result<PathBuf> {
    let (tmp, dest, old) = (run.join(TMP), run.join(DIR), run.join(OLD));
    if dest.exists() {
        if verify(&dest).is_ok() {
            if old.exists() {
                hook(SaveStep::RemoveOld)?;
                std::fs::remove_dir_all(&old).map_err(io(&old))?;
            }
            hook(SaveStep::RetireCurrent)?;
            std::fs::rename(&dest, &old).map_err(io(&dest))?;
        } else {
            // Never complete (or emptied by a power loss): the fallback stays as it is.
            hook(SaveStep::RetireCurrent)?;
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
    }
    hook(SaveStep::Install)?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    hook(SaveStep::SyncRun)?;
    sync_dir(run)?;
    Ok(dest)
}

/// Finish or clear a save that a crash interrupted: a complete temporary folder newer than
/// `checkpoint` is installed, anything else there is removed. Called before every save (so a
/// complete checkpoint is never deleted before its successor is in place).
pub fn recover(run: &Path) -> Result<()> {
    let tmp = run.join(TMP);
    if !tmp.exists() {
        return Ok(());
    }
    let newer = match (verify(&tmp), verify(&run.join(DIR))) {
        (Ok(t), Ok(c)) => t.step > c.step,
        (Ok(_), Err(_)) => true,
        (Err(_), _) => false,
    };
    if newer {
        install(run, &mut |_| Ok(()))?;
    } else {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    Ok(())
}

/// The state of a checkpoint folder whose files are all there with the recorded sizes and
/// digests (an error naming the first that is not).
pub fn verify(dir: &Path) -> Result<TrainState> {
    let st = read_state(dir)?;
    if st.files.is_empty() {
        // Written before digests were recorded: the two files resuming needs must exist.
        for f in ["model.safetensors", "optimizer.safetensors"] {
            if !dir.join(f).is_file() {
                return Err(Error::Checkpoint(format!(
                    "{}: {f} is missing",
                    dir.display()
                )));
            }
        }
        return Ok(st);
    }
    for (name, d) in &st.files {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        if bytes.len() as u64 != d.bytes || hex::encode(sha2::Sha256::digest(&bytes)) != d.sha256 {
            return Err(Error::Checkpoint(format!(
                "{}: {} bytes, not the {} recorded, or another digest",
                p.display(),
                bytes.len(),
                d.bytes
            )));
        }
    }
    Ok(st)
}

/// The newest checkpoint folder of a run that verifies (see [`verify`]): `checkpoint`, an
/// installed-but-not-renamed `.checkpoint.tmp`, or the fallback `checkpoint.old`.
pub fn latest(run: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for d in [run.join(DIR), run.join(TMP), run.join(OLD)] {
        if let Ok(st) = verify(&d) {
            let newer = match &best {
                Some((s, _)) => st.step > *s,
                None => true,
            };
            if newer {
                best = Some((st.step, d));
            }
        }
    }
    best.map(|b| b.1)
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

/// What `--checkpoint PATH` names, resolved once for every consumer of a trained encoder.
#[derive(Clone, Debug)]
pub struct EncoderFiles {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// The encoder weights: PATH itself when it is a file, else `dir/encoder.safetensors`.
    pub weights: PathBuf,
    /// The run's configuration saved beside the weights, when there is one.
    pub config: Option<crate::TrainConfig>,
}

impl EncoderFiles {
    /// The encoder's name: `given` (a flag) first, else the saved configuration's.
    pub fn encoder_name(&self, given: Option<&str>) -> Result<String> {
        match (given, &self.config) {
            (Some(e), _) => Ok(e.to_string()),
            (None, Some(c)) => Ok(c.encoder.clone()),
            (None, None) => Err(Error::Checkpoint(format!(
                "{}: no config.toml beside the weights; pass --encoder NAME",
                self.dir.display()
            ))),
        }
    }
}

/// Resolve `path` ([`resolve`]) to the encoder weights and the saved configuration.
pub fn encoder_files(path: &Path) -> Result<EncoderFiles> {
    let dir = resolve(path)?;
    let config = match std::fs::read_to_string(dir.join("config.toml")) {
        Ok(s) => Some(crate::TrainConfig::from_toml(&s)?),
        Err(_) => None,
    };
    let weights = if path.is_file() {
        path.to_path_buf()
    } else {
        dir.join("encoder.safetensors")
    };
    Ok(EncoderFiles {
        dir,
        weights,
        config,
    })
}
