//! The datasets the subcommands read: CIFAR-10 (fetched on first use) and image folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use selfsup_data::{cifar, folder, InMemory, Loader, Normalize};
use selfsup_train::setup::RunData;
use selfsup_train::TrainConfig;

pub(crate) fn load_cifar(
    cfg_data_dir: &str,
    source: &str,
    sha256: &str,
) -> Result<(InMemory, InMemory)> {
    let dir = PathBuf::from(cfg_data_dir);
    // Fetch only when there is no CIFAR-10 at all; files that are there but damaged are
    // reported by the reader (file and offset) rather than silently replaced.
    if !cifar::batches_dir(&dir).join(cifar::TEST_FILE).is_file() {
        tracing::info!("CIFAR-10 not found in {}: fetching it", dir.display());
        let opts = selfsup_data::download::FetchOptions {
            source: (!source.is_empty()).then(|| source.to_string()),
            sha256: (!sha256.is_empty()).then(|| sha256.to_string()),
            data_dir: dir.clone(),
            progress: true,
            attempts: 3,
        };
        selfsup_data::download::fetch_cifar10(&opts)?;
    }
    Ok((
        cifar::load(&dir, cifar::Split::Train)?,
        cifar::load(&dir, cifar::Split::Test)?,
    ))
}

pub(crate) fn load_folder(path: &str, size: usize) -> Result<InMemory> {
    let root = Path::new(path);
    let labelled = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().is_dir());
    let f = folder::load(
        root,
        &folder::FolderOptions {
            size,
            labelled,
            skip_bad: true,
        },
    )?;
    Ok(f.data)
}

pub(crate) fn run_data(cfg: &TrainConfig) -> Result<RunData> {
    if cfg.dataset == "cifar10" {
        let (train, test) = load_cifar(&cfg.data_dir, &cfg.source, &cfg.sha256)?;
        Ok(RunData {
            train: Arc::new(train),
            test: Some(Arc::new(test)),
            normalize: Normalize::cifar10(),
        })
    } else if let Some(p) = cfg.dataset.strip_prefix("folder:") {
        Ok(RunData {
            train: Arc::new(load_folder(p, cfg.image_size)?),
            test: None,
            normalize: Normalize::imagenet(),
        })
    } else {
        bail!("unknown dataset {:?} (cifar10 or folder:PATH)", cfg.dataset)
    }
}

/// [`Loader::for_eval`] over an in-memory dataset.
pub(crate) fn eval_loader(
    ds: InMemory,
    size: usize,
    norm: Normalize,
    threads: usize,
) -> Result<Loader> {
    Ok(Loader::for_eval(Arc::new(ds), size, norm, threads)?)
}

/// The dataset's identity for run records ([`selfsup_data::fingerprint`]); a dataset that
/// cannot be read says so instead.
pub(crate) fn dataset_id(dataset: &str, data_dir: &str) -> String {
    let id = match dataset.strip_prefix("folder:") {
        Some(p) => selfsup_data::fingerprint::folder(Path::new(p)),
        None => selfsup_data::fingerprint::cifar10(Path::new(data_dir)),
    };
    id.unwrap_or_else(|e| format!("{dataset}: unknown ({e})"))
}
