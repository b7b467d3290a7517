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

/// Write tensors to `path` atomically and durably (temporary file in the same folder, fsync,
/// rename, fsync of the folder).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Weights {
            path: path.to_path_buf(),
            msg: format!("cannot write: {e}"),
        }
    })?;
    // On disk before the rename makes it visible (a power loss leaves the old file or the new).
    if let Err(e) = std::fs::File::open(&tmp).and_then(|f| f.sync_all()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
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
