//! Helpers shared by the trainer's integration tests.

use std::sync::Arc;

use selfsup_data::{synthetic, Normalize};
use selfsup_train::checkpoint;
use selfsup_train::setup::RunData;
use selfsup_train::TrainConfig;

/// 64 striped training images and 16 test images of 32 px, 4 classes.
pub fn stripes_data() -> RunData {
    RunData {
        train: Arc::new(synthetic::stripes(64, 32, 4, 1)),
        test: Some(Arc::new(synthetic::stripes(16, 32, 4, 2))),
        normalize: Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    }
}

/// A run folder's checkpointed weights as bit patterns, sorted by name: equal means equal to
/// the bit.
pub fn checkpoint_bits(dir: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    file_bits(dir, "model.safetensors")
}

/// The tensors of `dir/checkpoint/file` as bit patterns, sorted by name.
#[allow(dead_code)]
pub fn file_bits(dir: &std::path::Path, file: &str) -> Vec<(String, Vec<u32>)> {
    let w = checkpoint::read_tensors(&dir.join("checkpoint").join(file)).unwrap();
    let mut v: Vec<_> = w
        .iter()
        .map(|(k, t)| {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), x.iter().map(|f| f.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

/// VICReg with its defaults, batch 16, writing into `out`: the base the tests change.
pub fn vicreg_batch16(out: &std::path::Path) -> TrainConfig {
    let mut c = TrainConfig {
        batch_size: 16,
        out: out.to_str().unwrap().to_string(),
        ..Default::default()
    };
    c.apply_method_defaults("vicreg");
    c
}
