//! `cargo xtask bench train-step --ranks N`: the SimCLR step data-parallel over N MPI ranks of
//! one thread each, against one process with every thread on the same global batch.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Build xtask with the `mpi` feature into `target/mpi` and run the rank side under mpirun.
pub fn launch(
    one_process: f64,
    model: &str,
    batch: usize,
    steps: usize,
    ranks: usize,
    sync_bn: bool,
) -> Result<()> {
    if !batch.is_multiple_of(ranks) {
        bail!("--batch {batch} must be a multiple of --ranks {ranks}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let st = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "xtask", "--features", "mpi"])
        .args(["--target-dir", "target/mpi"])
        .status()
        .context("cargo build (xtask with the mpi feature)")?;
    if !st.success() {
        bail!("building xtask with the mpi feature failed (needs openmpi-bin libopenmpi-dev libclang-dev)");
    }
    let bin = format!("{root}/target/mpi/release/xtask");
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &ranks.to_string(),
        ])
        .args([
            "-x",
            "RAYON_NUM_THREADS=1",
            "-x",
            "OMPI_MCA_btl_vader_single_copy_mechanism=none",
        ])
        .args([&bin, "bench", "train-step", "--model", model])
        .args(["--batch", &batch.to_string(), "--steps", &steps.to_string()])
        .args(if sync_bn { &["--sync-bn"][..] } else { &[][..] })
        .arg("--mpi-worker")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .context("mpirun")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("mpirun failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let rate: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("data-parallel images/s: "))
        .and_then(|v| v.trim().parse().ok())
        .context("no rate in the ranks' output")?;
    println!(
        "{ranks} ranks x 1 thread / 1 process x {} threads: {rate:.1} / {one_process:.1} images/s = {:.2}x",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        rate / one_process
    );
    Ok(())
}

/// One rank: the global `batch` split over the ranks, embeddings gathered, gradients
/// all-reduced in one flat buffer; rank 0 prints the medians.
#[cfg(feature = "mpi")]
pub fn worker(model: &str, batch: usize, steps: usize, sync_bn: bool) -> Result<()> {
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};
    use selfsup_dist::{Comm, MpiComm};
    use selfsup_methods::{Method, Placement, SimClr, SimClrConfig};
    use selfsup_train::optim::{Optim, OptimConfig, OptimizerKind};

    let comm: Comm = Arc::new(MpiComm::init()?);
    let (rank, world) = (comm.rank(), comm.world_size());
    let local = batch / world;
    let dev = Device::Cpu;
    let kind: selfsup_models::EncoderKind = model.parse()?;
    let at = Placement {
        comm: comm.clone(),
        ..Placement::new(dev.clone(), DType::F32)
    };
    let m = {
        let _sync = selfsup_models::layers::sync_batch_norm_scope(sync_bn.then(|| comm.clone()));
        SimClr::new(
            &kind,
            &SimClrConfig {
                hidden_dim: 512,
                out_dim: 128,
                temperature: 0.5,
            },
            0,
            &at,
        )?
    };
    let params = selfsup_train::method_params(&m);
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let mut opt = Optim::new(OptimConfig::defaults(OptimizerKind::Sgd), params)?;
    let v0 = Tensor::randn(0f32, 1., (local, 3, 32, 32), &dev)?;
    let v1 = Tensor::randn(0f32, 1., (local, 3, 32, 32), &dev)?;
    let (mut step_s, mut ar_s) = (Vec::new(), Vec::new());
    for i in 0..=steps {
        comm.barrier()?;
        let t = Instant::now();
        let out = m.forward_loss(&[v0.clone(), v1.clone()], None)?;
        let mut g = out.loss.backward()?;
        let ta = Instant::now();
        selfsup_train::all_reduce_gradients(comm.as_ref(), opt.params(), &mut g)?;
        let ar = ta.elapsed().as_secs_f64();
        opt.step(&g, 0.1, 1.0)?;
        let dt = t.elapsed().as_secs_f64();
        if rank == 0 {
            println!(
                "step {i}: {dt:.3} s, all-reduce {:.1} ms, {:.1} images/s{}",
                1e3 * ar,
                2.0 * batch as f64 / dt,
                if i == 0 { " [warm-up]" } else { "" }
            );
        }
        if i > 0 {
            step_s.push(dt);
            ar_s.push(ar);
        }
    }
    if rank == 0 {
        let (s, a) = (crate::bench::median(step_s), crate::bench::median(ar_s));
        let (_, peak) = crate::bench::rss_mib();
        println!(
            "SimCLR train step, {model}, global batch {batch} on {world} MPI ranks x {} thread(s){}: median {s:.3} s, gradient all-reduce {:.1} ms ({:.1} MB of f32 gradients, {} parameters), rank 0 peak RSS {peak:.0} MiB",
            candle_core::utils::get_num_threads(),
            if sync_bn { ", synchronised BatchNorm" } else { "" },
            1e3 * a,
            4.0 * n_params as f64 / 1e6,
            n_params
        );
        println!("data-parallel images/s: {:.1}", 2.0 * batch as f64 / s);
    }
    Ok(())
}

/// Without the `mpi` feature there is no rank side.
#[cfg(not(feature = "mpi"))]
pub fn worker(_model: &str, _batch: usize, _steps: usize, _sync_bn: bool) -> Result<()> {
    bail!("this xtask was built without the mpi feature")
}
