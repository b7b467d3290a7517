//! Saving and loading weights as safetensors with torchvision names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::{Error, Result};

/// All variables of `varmap` (parameters and BatchNorm buffers) by name, sorted.
pub fn named_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Write a file atomically and durably: `write` fills a temporary file in the same folder,
/// which is fsync'd, renamed over `path`, and the folder fsync'd. A power loss or a kill leaves
/// the old file or the new one, never a partial one; a failed write removes the temporary file.
/// The one atomic writer of the workspace (configs, metrics, weights, embeddings).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = path.with_extension(format!("tmp-{}.{ext}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let written = write(&tmp).and_then(|()| std::fs::File::open(&tmp)?.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// [`write_atomic_with`] for bytes in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Write tensors to `path` as safetensors, atomically and durably ([`write_atomic_with`]).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
}

/// Save every variable of `varmap`, with `prefix` stripped from the names (`""`: none), to a
/// safetensors file, atomically.
pub fn save_varmap(varmap: &VarMap, prefix: &str, path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = named_tensors(varmap)
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t)))
        .collect();
    save_tensors(&map, path)
}

/// Read all tensors of a safetensors file onto the CPU.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: "file not found".into(),
        });
    }
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        msg: format!("not a readable safetensors file: {e}"),
    })
}

/// Set every variable of `varmap` whose name starts with `prefix` from `path` (names there
/// without the prefix). Every such variable must be present with the same shape; the error
/// names the first that is not.
pub fn load_varmap(varmap: &VarMap, prefix: &str, path: &Path) -> Result<()> {
    let file = read_tensors(path)?;
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    let mut missing = Vec::new();
    for name in &names {
        let key = &name[prefix.len()..];
        match file.get(key) {
            None => missing.push(key.to_string()),
            Some(t) => {
                let var = &data[*name];
                if t.shape() != var.shape() {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        msg: format!(
                            "{key} has shape {:?} in the file but {:?} in the model (weights of another architecture?)",
                            t.dims(),
                            var.dims()
                        ),
                    });
                }
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
    }
    if !missing.is_empty() {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: format!(
                "{} of the model's {} tensors are missing, e.g. {} (weights of another architecture?)",
                missing.len(),
                names.len(),
                missing[..missing.len().min(3)].join(", ")
            ),
        });
    }
    Ok(())
}
