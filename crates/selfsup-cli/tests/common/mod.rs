//! Helpers shared by the CLI test binaries (`cli.rs`, `mpi.rs`, `ranks.rs`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};

/// The `selfsup` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_selfsup");

/// A command running the `selfsup` binary.
pub fn selfsup() -> Command {
    Command::new(BIN)
}

/// The command succeeded, or its output in the failure.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 48 striped images of 16x16 in two class folders.
pub fn write_folder(root: &Path) {
    let data = selfsup_data::synthetic::stripes(48, 16, 2, 5);
    for i in 0..48 {
        let item = selfsup_data::Dataset::get(&data, i).unwrap();
        let dir = root.join(format!("class{}", item.label.unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        item.image
            .to_rgb()
            .save(dir.join(format!("{i}.png")))
            .unwrap();
    }
}

/// A CIFAR-10 folder of 20 noise images per file (labels cycling 0-9), test image 0 equal to
/// training image 7.
pub fn write_small_cifar(root: &Path) {
    use selfsup_data::cifar;
    let b = root.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&b).unwrap();
    let per = 20;
    let mut rng = 1u32;
    let mut noise = || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        (rng >> 24) as u8
    };
    let mut first_train = Vec::new();
    for (fi, f) in cifar::TRAIN_FILES
        .iter()
        .chain([cifar::TEST_FILE].iter())
        .enumerate()
    {
        let labels: Vec<u8> = (0..per).map(|i| (i % 10) as u8).collect();
        let mut px: Vec<u8> = (0..per * 3072).map(|_| noise()).collect();
        if fi == 0 {
            first_train = px.clone();
        }
        if fi == 5 {
            // Test image 0 is training image 7 exactly.
            px[..3072].copy_from_slice(&first_train[7 * 3072..8 * 3072]);
        }
        cifar::write_batch(&b.join(f), &px, &labels).unwrap();
    }
    std::fs::write(b.join(cifar::META_FILE), cifar::CLASSES.join("\n")).unwrap();
}

/// `selfsup train` arguments of the data-parallel tests: `method` on the striped folder of
/// [`setup`], batch 16, one thread, small heads, no kNN monitor.
pub fn train_args(imgs: &Path, run: &Path, method: &str, epochs: usize) -> Vec<String> {
    [
        "train",
        "--method",
        method,
        "--dataset",
        &format!("folder:{}", imgs.display()),
        "--epochs",
        &epochs.to_string(),
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--warmup-epochs",
        "0",
        "--queue-size",
        "32",
        "--proj-hidden",
        "32",
        "--proj-out",
        "16",
        "--out",
        run.to_str().unwrap(),
        "--config",
        imgs.parent().unwrap().join("small.toml").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A temporary folder with `imgs/` ([`write_folder`]) and `small.toml` (16 px images, a
/// metrics line per step, no kNN monitor).
pub fn setup() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_folder(&d.path().join("imgs"));
    std::fs::write(
        d.path().join("small.toml"),
        "image_size = 16\nlog_every = 1\nknn_every = 0\n",
    )
    .unwrap();
    d
}

/// The weights of a run's last checkpoint.
pub fn model(run: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run.join("checkpoint/model.safetensors"), &Device::Cpu).unwrap()
}

/// The loss of every step of a run, in order.
pub fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// `||a - b|| / max(||a - prev||, 1e-3 ||a||)`: how far two runs ended apart, against how far
/// the reference moved in its last epoch (`prev`: its previous checkpoint, `checkpoint.old`).
pub fn deviation(a: &Tensor, b: &Tensor, prev: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b, p) = (f(a), f(b), f(prev));
    let n = |t: Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let scale = n((&a - &p).unwrap()).max(1e-3 * n(a.clone())).max(1e-12);
    n((&a - &b).unwrap()) / scale
}

/// Runs `one` (one process, 2 epochs of 3 steps) and `two` (the same on several ranks, `what`)
/// trained alike: every step's loss within 1e-4, every tensor within 5% of its last-epoch update.
pub fn assert_same_training(method: &str, one: &Path, two: &Path, what: &str) {
    let (l1, l2) = (losses(one), losses(two));
    assert_eq!(l1.len(), 6, "3 steps x 2 epochs");
    assert_eq!(l1.len(), l2.len());
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "{method}: loss {a} vs {b}"
        );
    }
    let (m1, m2) = (model(one), model(two));
    let prev =
        candle_core::safetensors::load(one.join("checkpoint.old/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(m1.len(), m2.len());
    let mut worst = 0f64;
    for (name, t) in &m1 {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        worst = worst.max(deviation(t, &m2[name], &prev[name]));
        // Against the tensor's last-epoch update (the in-process tests, selfsup-train
        // tests/dist.rs, measure it against the whole run's update, with 1e-2): f32 last-bit
        // differences, and the rare max-pool / ReLU tie they flip, stay far below it; a wrong
        // gather or gradient scale moves tensors by their whole update.
        let r = deviation(t, &m2[name], &prev[name]);
        assert!(
            r < 5e-2,
            "{method}: {name} deviates by {r:.2e} of its update (1 process vs {what})"
        );
    }
    eprintln!("{method}: worst deviation {worst:.2e} ({what})");
}
