//! `cargo xtask bench ...`: throughput benchmarks. They print; docs/benchmarks.md records them.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use selfsup_data::{preset_views, InMemory, Loader, LoaderConfig, Normalize, Preset};

#[derive(Subcommand)]
pub enum Bench {
    /// Images/s of the `simclr_cifar` two-view pipeline (augment + normalise + batch) on 1 and 2 threads.
    Augment {
        /// Images per measurement.
        #[arg(long, default_value_t = 20_000)]
        images: usize,
        /// Batch size.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Also run xtask/scripts/bench_augment_torchvision.py with `$SELFSUP_PYTHON` (default
        /// `python3`), which needs torch and torchvision.
        #[arg(long)]
        compare_torchvision: bool,
    },
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Augment {
            images,
            batch,
            compare_torchvision,
        } => {
            augment(images, batch)?;
            if compare_torchvision {
                let script = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/scripts/bench_augment_torchvision.py"
                );
                for args in [["--threads", "1"], ["--workers", "2"]] {
                    python(&[script, "--batch", &batch.to_string(), args[0], args[1]])?;
                }
            }
            Ok(())
        }
    }
}

/// A synthetic CIFAR-sized dataset (content does not change the cost of these transforms).
fn synthetic(n: usize) -> InMemory {
    let mut s = 0x1234_5678u32;
    let pixels = (0..n * 3072)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as u8
        })
        .collect();
    InMemory {
        pixels,
        labels: None,
        class_names: vec![],
        channels: 3,
        height: 32,
        width: 32,
    }
}

fn augment(images: usize, batch: usize) -> Result<()> {
    let ds = Arc::new(synthetic(images));
    println!("simclr_cifar, 2 views of 32x32, batch {batch}, {images} images per run");
    for threads in [1usize, 2] {
        let cfg = LoaderConfig {
            batch_size: batch,
            threads,
            seed: 0,
            ..Default::default()
        };
        let l = Loader::new(
            ds.clone(),
            preset_views(Preset::SimclrCifar, 32, Normalize::cifar10()),
            cfg,
        )?;
        // Warm-up epoch, then the best of three.
        for b in l.epoch(0) {
            b?;
        }
        let mut best = f64::MAX;
        for e in 1..4 {
            let t = Instant::now();
            let mut n = 0;
            for b in l.epoch(e) {
                n += b?.indices.len();
            }
            best = best.min(t.elapsed().as_secs_f64() / n as f64);
        }
        println!(
            "threads {threads}: {:>9.0} images/s ({:.0} views/s)",
            1.0 / best,
            2.0 / best
        );
    }
    Ok(())
}

/// Run a Python script with `$SELFSUP_PYTHON` (default `python3`).
pub fn python(args: &[&str]) -> Result<()> {
    let py = std::env::var("SELFSUP_PYTHON").unwrap_or_else(|_| "python3".into());
    let st = std::process::Command::new(&py)
        .args(args)
        .status()
        .map_err(|e| {
            anyhow::anyhow!("cannot run {py}: {e} (set SELFSUP_PYTHON to a Python with torch)")
        })?;
    anyhow::ensure!(
        st.success(),
        "{py} {} failed with {st} (is torch installed there?)",
        args.join(" ")
    );
    Ok(())
}
