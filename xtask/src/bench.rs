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
    /// A SimCLR training step (forward of both views, NT-Xent, backward, SGD step): images/s,
    /// forward/backward split and memory, per step.
    TrainStep {
        /// small-cnn, resnet18, ... (any encoder name).
        #[arg(long, default_value = "small-cnn")]
        model: String,
        /// Images per batch (two views each).
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Steps to time (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Also run the identical PyTorch step (xtask/scripts/bench_train_step_torch.py with
        /// `$SELFSUP_PYTHON`, default `python3`; needs torch) and print the ratio.
        #[arg(long)]
        compare_pytorch: bool,
        /// Data-parallel: after the one-process step (all threads), the same global batch on N
        /// MPI ranks of one thread each (`mpirun -np N`, embeddings gathered, gradients
        /// all-reduced), the ratio, and the all-reduce time per step. Builds xtask with the `mpi`
        /// feature into target/mpi.
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        /// With --ranks: BatchNorm synchronised over the ranks.
        #[arg(long)]
        sync_bn: bool,
        /// Internal: this process is one MPI rank of `--ranks`.
        #[arg(long, hide = true)]
        mpi_worker: bool,
        /// cpu or cuda:N (a build with the `cuda` feature; GPU memory from nvidia-smi).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Inference: the encoder's eval-mode forward (feature extraction for kNN, linear probe and
    /// `embed`): images/s and memory.
    Infer {
        /// small-cnn, resnet18, ... (any encoder name).
        #[arg(long, default_value = "small-cnn")]
        model: String,
        /// Images per batch.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Batches to time (after one warm-up batch).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Also run the identical PyTorch forward (the train-step script with `--infer`:
        /// `eval()` and `torch.inference_mode()`) and print the ratio.
        #[arg(long)]
        compare_pytorch: bool,
    },
    /// Forward + backward time of each loss at N = 512, D = 128 (f32, CPU), next to a small-cnn
    /// forward + backward on 512 images (the two views of a batch of 256).
    Losses {
        /// Rows per input.
        #[arg(long, default_value_t = 512)]
        n: usize,
        /// Embedding dimension.
        #[arg(long, default_value_t = 128)]
        d: usize,
    },
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Losses { n, d } => losses(n, d),
        Bench::TrainStep {
            model,
            batch,
            steps,
            compare_pytorch,
            ranks,
            sync_bn,
            mpi_worker,
            device,
        } => {
            if mpi_worker {
                return crate::bench_dist::worker(&model, batch, steps, sync_bn);
            }
            let ours = train_step(&model, batch, steps, &device)?;
            if compare_pytorch {
                compare_torch(ours, &model, batch, steps, false)?;
            }
            if ranks > 1 {
                crate::bench_dist::launch(ours, &model, batch, steps, ranks, sync_bn)?;
            }
            Ok(())
        }
        Bench::Infer {
            model,
            batch,
            steps,
            compare_pytorch,
        } => {
            let ours = infer(&model, batch, steps)?;
            if compare_pytorch {
                compare_torch(ours, &model, batch, steps, true)?;
            }
            Ok(())
        }
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

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_it(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn losses(n: usize, d: usize) -> Result<()> {
    use candle_core::{DType, Device, Tensor, Var};
    use selfsup_losses::*;
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::randn(0f32, 1., (n, d), &dev)?)?;
    let b = Tensor::randn(0f32, 1., (n, d), &dev)?;
    let queue = Tensor::randn(0f32, 1., (4096, d), &dev)?;
    let labels = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), n, &dev)?;
    let pair: Vec<(&str, Box<dyn PairLoss>)> = vec![
        ("nt_xent", Box::new(NtXent::new(0.5)?)),
        ("info_nce", Box::new(InfoNce::new(0.2)?)),
        ("cosine", Box::new(CosineSimilarity)),
        ("negative_cosine", Box::new(NegativeCosine)),
        ("barlow_twins", Box::new(BarlowTwins::new(5e-3)?)),
        ("vicreg", Box::new(Vicreg::new(25., 25., 1.)?)),
    ];
    println!(
        "loss forward+backward, N={n}, D={d}, f32, CPU ({} threads), median of 20",
        candle_core::utils::get_num_threads()
    );
    let mut nt_xent = 0.0;
    for (name, l) in &pair {
        let t = time_it(20, || {
            l.loss(a.as_tensor(), &b)?.backward()?;
            Ok(())
        })?;
        if *name == "nt_xent" {
            nt_xent = t;
        }
        println!("{name:>16}: {:8.3} ms", t * 1e3);
    }
    let t = time_it(20, || {
        InfoNce::new(0.2)?
            .loss_with_negatives(a.as_tensor(), &b, Some(&queue))?
            .backward()?;
        Ok(())
    })?;
    println!("{:>16}: {:8.3} ms", "info_nce+queue4096", t * 1e3);
    let t = time_it(20, || {
        let f = Tensor::stack(&[a.as_tensor(), &b], 1)?;
        SupCon::new(0.1)?.loss(&f, &labels)?.backward()?;
        Ok(())
    })?;
    println!("{:>16}: {:8.3} ms", "supcon (2 views)", t * 1e3);
    // A small-cnn forward + backward on 512 images for scale.
    let vm = candle_nn::VarMap::new();
    let enc = selfsup_models::build_encoder(
        &selfsup_models::EncoderKind::SmallCnn,
        selfsup_models::seeded_var_builder(&vm, 0, DType::F32, &dev),
    )?;
    let x = Tensor::randn(0f32, 1., (512, 3, 32, 32), &dev)?;
    let step = time_it(3, || {
        enc.forward_t(&x, true)?.sqr()?.mean_all()?.backward()?;
        Ok(())
    })?;
    println!(
        "small-cnn fwd+bwd on 512 images: {:.1} ms; NT-Xent is {:.2}% of it",
        step * 1e3,
        100.0 * nt_xent / step
    );
    Ok(())
}

/// Current and peak resident memory in MiB, from /proc/self/status.
/// Minor page faults of this process so far (`/proc/self/stat` field 10; 0 where unreadable).
/// Each one is a page the kernel had to find and zero: a sign of allocation churn.
pub fn minor_faults() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    s.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Run a Python script and return its standard output.
fn python_output(args: &[&str]) -> Result<String> {
    let py = std::env::var("SELFSUP_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&py)
        .args(args)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("cannot run {py}: {e} (set SELFSUP_PYTHON to a Python with torch)")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "{py} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run xtask/scripts/bench_train_step_torch.py and print its line and the ratio.
fn compare_torch(ours: f64, model: &str, batch: usize, steps: usize, infer: bool) -> Result<()> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/bench_train_step_torch.py"
    );
    let threads = candle_core::utils::get_num_threads().to_string();
    let (b, s) = (batch.to_string(), steps.to_string());
    let mut args = vec![
        script,
        "--model",
        model,
        "--batch",
        &b,
        "--steps",
        &s,
        "--threads",
        &threads,
    ];
    if infer {
        args.push("--infer");
    }
    let torch = python_output(&args)?;
    print!("{torch}");
    let words: Vec<&str> = torch.split_whitespace().collect();
    let theirs: f64 = words
        .windows(2)
        .find(|w| w[1].trim_end_matches(';') == "images/s")
        .and_then(|w| w[0].parse().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read the PyTorch images/s"))?;
    println!("selfsup / pytorch: {:.2}x", ours / theirs);
    Ok(())
}

/// Eval-mode encoder forward of `batch` random images, as feature extraction runs it.
fn infer(model: &str, batch: usize, steps: usize) -> Result<f64> {
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let kind: selfsup_models::EncoderKind = model.parse()?;
    let vm = candle_nn::VarMap::new();
    let vb = selfsup_models::seeded_var_builder(&vm, 0, DType::F32, &dev);
    let enc = selfsup_models::build_encoder(&kind, vb)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, 32, 32), &dev)?;
    println!(
        "inference, {model}, batch {batch}, CPU {} threads",
        candle_core::utils::get_num_threads()
    );
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        let f = enc.features(&x)?;
        let _ = f.sum_all()?.to_scalar::<f32>()?;
        let dt = t.elapsed().as_secs_f64();
        println!(
            "batch {i}: {:.3} s, {:.1} images/s{}",
            dt,
            batch as f64 / dt,
            if i == 0 { " [warm-up]" } else { "" }
        );
        if i > 0 {
            times.push(dt);
        }
    }
    let t = median(times);
    let (_, peak) = rss_mib();
    let rate = batch as f64 / t;
    println!("selfsup median: {t:.3} s per batch, {rate:.1} images/s; peak RSS {peak:.0} MiB");
    Ok(rate)
}

pub(crate) fn train_step(model: &str, batch: usize, steps: usize, device: &str) -> Result<f64> {
    use candle_core::{DType, Tensor};
    use selfsup_methods::{Method, Placement, SimClr, SimClrConfig};
    use selfsup_train::optim::{Optim, OptimConfig, OptimizerKind};
    let dev = selfsup_train::parse_device(device)?;
    let on_gpu = !dev.is_cpu();
    let kind: selfsup_models::EncoderKind = model.parse()?;
    let m = SimClr::new(
        &kind,
        &SimClrConfig {
            hidden_dim: 512,
            out_dim: 128,
            temperature: 0.5,
        },
        0,
        &Placement::new(dev.clone(), DType::F32),
    )?;
    let params = selfsup_train::method_params(&m);
    let mut opt = Optim::new(OptimConfig::defaults(OptimizerKind::Sgd), params)?;
    let v0 = Tensor::randn(0f32, 1., (batch, 3, 32, 32), &dev)?;
    let v1 = Tensor::randn(0f32, 1., (batch, 3, 32, 32), &dev)?;
    println!(
        "SimCLR train step, {model}, batch {batch} ({} images through the encoder), {}",
        2 * batch,
        if on_gpu {
            format!("{device:?}")
        } else {
            format!("CPU {} threads", candle_core::utils::get_num_threads())
        }
    );
    let mut gpu_peak = 0u64;
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for i in 0..=steps {
        let faults = minor_faults();
        let t = Instant::now();
        let out = m.forward_loss(&[v0.clone(), v1.clone()], None)?;
        let _ = out.loss.to_scalar::<f32>()?;
        dev.synchronize()?;
        let tf = t.elapsed().as_secs_f64();
        if on_gpu {
            gpu_peak = gpu_peak.max(gpu_used_mib());
        }
        let t = Instant::now();
        let g = out.loss.backward()?;
        opt.step(&g, 0.1, 1.0)?;
        dev.synchronize()?;
        let tb = t.elapsed().as_secs_f64();
        if on_gpu {
            gpu_peak = gpu_peak.max(gpu_used_mib());
        }
        drop(g);
        drop(out);
        let (rss, peak) = rss_mib();
        let faults = minor_faults() - faults;
        println!("step {i}: forward {:.2} s, backward+update {:.2} s, {:.1} images/s, RSS {rss:.0} MiB (peak {peak:.0}), {faults} page faults{}", tf, tb, 2.0 * batch as f64 / (tf + tb), if i == 0 { " [warm-up]" } else { "" });
        if i > 0 {
            fwd.push(tf);
            bwd.push(tb);
        }
    }
    let (f, b) = (median(fwd), median(bwd));
    let (_, peak) = rss_mib();
    let rate = 2.0 * batch as f64 / (f + b);
    println!("selfsup median: forward {f:.3} s, backward {b:.3} s, {rate:.1} images/s (views); peak RSS {peak:.0} MiB");
    if on_gpu {
        println!(
            "GPU memory in use at the step's peaks (nvidia-smi, whole device): {gpu_peak} MiB"
        );
    }
    Ok(rate)
}

/// GPU 0's memory in use (MiB), from nvidia-smi; 0 where it cannot be read.
fn gpu_used_mib() -> u64 {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}
