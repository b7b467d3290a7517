//! `selfsup train`: checks that refuse a run the machine or the folder cannot take, then the
//! trainer on one process or one rank of many.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use selfsup_dist::Communicator;
use selfsup_train::setup::build_trainer_dist;
use selfsup_train::{checkpoint, TrainConfig};

use crate::{config::*, data::*, set_threads};

pub(crate) fn train(a: &TrainArgs) -> Result<()> {
    let mode: selfsup_dist::Mode = a.dist.parse()?;
    if !a.print_config {
        let cfg = effective_config(a)?;
        let launched = selfsup_dist::launcher_world_size().unwrap_or(1);
        let under_launcher =
            mode == selfsup_dist::Mode::Mpi || (mode == selfsup_dist::Mode::Auto && launched > 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ranks = cfg.local_ranks(cores, under_launcher);
        if ranks > 1 {
            if under_launcher {
                bail!(
                    "ranks = {ranks} runs its ranks as threads of one process; under mpirun / srun (or --dist mpi) every process is one rank, so leave ranks at 1 there"
                );
            }
            return train_local(a, ranks);
        }
    }
    let comm = selfsup_dist::init(mode)?;
    let r = train_on(a, comm.clone(), None);
    if let (Err(e), true) = (&r, comm.world_size() > 1) {
        // Stop every rank now: the others would wait in their next collective forever.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!(
            "error: rank {} of {}: {msg}",
            comm.rank(),
            comm.world_size()
        );
        comm.abort(2);
    }
    r
}

/// Data parallelism inside this process: `ranks` threads over a [`selfsup_dist::LocalGroup`],
/// each the whole trainer of one rank (`batch / ranks` images of every global batch) with its
/// kernels on a pool of its own threads. Small encoders train faster so on a few cores than
/// one process whose every op is split across the cores: the ranks synchronise a few times
/// per step instead of inside every op (docs/scaling.md has the measurements).
fn train_local(a: &TrainArgs, ranks: usize) -> Result<()> {
    let cfg = effective_config(a)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if cfg.threads == 0 {
        (cores / ranks).max(1)
    } else {
        cfg.threads
    };
    if ranks * threads > cores {
        bail!(
            "{ranks} ranks x {threads} threads is more than this machine's {cores} cores (--threads is per rank)"
        );
    }
    // candle sizes its own thread pool and its matrix products from RAYON_NUM_THREADS: per rank.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let group = selfsup_dist::LocalGroup::new(ranks)?;
    std::thread::scope(|s| {
        for member in group {
            s.spawn(move || {
                let rank = member.rank();
                let run = std::panic::AssertUnwindSafe(|| -> Result<()> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("selfsup-rank{rank}-{i}"))
                        .build()?;
                    pool.install(|| train_on(a, Arc::new(member), Some(threads)))
                });
                // A rank that fails stops the process: the others would wait in their next
                // collective forever (what MPI_Abort does for processes).
                let code = match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        let msg = format!("{e:#}").replace('\n', " ");
                        eprintln!("error: rank {rank} of {ranks}: {msg}");
                        2
                    }
                    Err(_) => 101,
                };
                std::process::exit(code);
            });
        }
    });
    Ok(())
}

/// `folder:PATH` with an absolute path (other dataset names as they are), so that a run's saved
/// configuration resumes from any working directory.
pub(crate) fn absolute_dataset(d: &str) -> Result<String> {
    Ok(match d.strip_prefix("folder:") {
        Some(p) => format!("folder:{}", std::path::absolute(p)?.display()),
        None => d.to_string(),
    })
}

/// Local paths of a new run's configuration made absolute (see [`absolute_dataset`]).
pub(crate) fn absolute_paths(cfg: &mut TrainConfig) -> Result<()> {
    cfg.dataset = absolute_dataset(&cfg.dataset)?;
    if !cfg.data_dir.is_empty() {
        cfg.data_dir = std::path::absolute(&cfg.data_dir)?.display().to_string();
    }
    if !cfg.source.is_empty() && !cfg.source.contains("://") {
        cfg.source = std::path::absolute(&cfg.source)?.display().to_string();
    }
    Ok(())
}

/// What a run folder may hold: a folder with anything else is not one.
pub(crate) const RUN_FILES: [&str; 8] = [
    "config.toml",
    "record.jsonl",
    "metrics.jsonl",
    "metrics.png",
    "checkpoint",
    "checkpoint.old",
    ".checkpoint.tmp",
    ".lock",
];

/// `dir` is missing, empty, or holds only what a run folder holds ([`RUN_FILES`]); otherwise an
/// error naming what else is there (it is not ours to write into or replace).
pub(crate) fn ensure_run_folder(dir: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let foreign: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !RUN_FILES.contains(&n.as_str()))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "{} holds files that are not a selfsup run ({}); choose another --out",
            dir.display(),
            foreign.join(", ")
        );
    }
    Ok(())
}

/// The machine's memory (`MemTotal` of /proc/meminfo), where it can be read.
pub(crate) fn total_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Threads per rank when `--threads 0`: the machine's cores shared by the ranks on this node.
pub(crate) fn threads_per_rank(world: usize) -> usize {
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
    .unwrap_or(world)
    .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local).max(1)
}

/// One rank's run (the only one in one process). `local_threads`: this rank is a thread of
/// [`train_local`] and its compute threads are set up already.
pub(crate) fn train_on(
    a: &TrainArgs,
    comm: selfsup_dist::Comm,
    local_threads: Option<usize>,
) -> Result<()> {
    let mut cfg = effective_config(a)?;
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (rank, world) = (comm.rank(), comm.world_size());
    if !a.resume {
        absolute_paths(&mut cfg)?;
    }
    if let Some(t) = local_threads {
        cfg.threads = t;
    } else if world > 1 && cfg.threads == 0 {
        cfg.threads = threads_per_rank(world);
    }
    if world > 1 && cfg.batch_size % world != 0 {
        bail!(
            "--batch-size {} is the global batch and must be a multiple of the {world} ranks",
            cfg.batch_size
        );
    }
    if world > 1 {
        tracing::info!(
            "rank {rank} of {world} ({}): {} images per rank and step, {} threads per rank{}",
            comm.engine(),
            cfg.batch_size / world,
            cfg.threads,
            if cfg.sync_bn {
                ", synchronised BatchNorm"
            } else {
                ""
            }
        );
    }
    // Requests the machine cannot serve are refused before anything is allocated.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg.threads > cores {
        bail!(
            "--threads {} is more than this machine's {cores} cores (threads are per process / rank)",
            cfg.threads
        );
    }
    // Ranks that are threads of this process share its memory.
    let local_ranks = if local_threads.is_some() { world } else { 1 };
    let need = selfsup_train::setup::estimated_peak_bytes(&cfg, world)? * local_ranks as f64;
    if let Some(have) = total_memory_bytes() {
        if need > have as f64 {
            bail!(
                "this run needs about {:.1} GiB per process (encoder {}, image size {}, batch {} per rank, {local_ranks} ranks in the process), more than the machine's {:.1} GiB",
                need / 1073741824.0,
                cfg.encoder,
                cfg.image_size,
                cfg.batch_size / world,
                have as f64 / 1073741824.0
            );
        }
    }
    if local_threads.is_none() {
        set_threads(cfg.threads);
    }
    let out = Path::new(&cfg.out);
    if !a.resume {
        // A new run goes into an empty folder or one that only a stopped run used.
        ensure_run_folder(out)?;
    }
    // One process per run folder (rank 0 writes it): refused at once, before anything is read.
    let lock = if rank == 0 {
        Some(selfsup_train::RunLock::acquire(out)?)
    } else {
        None
    };
    if !a.resume && checkpoint::latest(out).is_some() {
        bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    // Rank 0 fetches / unpacks the data first; the others then read what it left.
    if rank != 0 {
        comm.barrier()?;
    }
    let data = run_data(&cfg);
    if rank == 0 {
        comm.barrier()?;
    }
    let mut t = build_trainer_dist(&cfg, data?, comm.clone())?;
    // SIGINT / SIGTERM: finish nothing half-way, stop between two steps, say how to resume; a
    // second signal stops at once (an interrupted save is finished or cleared on the next start).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
                eprintln!("second signal: stopping now");
                std::process::exit(130);
            }
            eprintln!("signal: stopping after the current step (again to stop at once)");
        });
    }
    t.set_stop_flag(stop);
    if rank == 0 {
        if let Some(bar) = crate::progress::Bar::on_terminal() {
            t.set_progress(bar);
        }
    }
    if let Some(lock) = lock {
        t.adopt_lock(lock);
    }
    if a.resume && !t.resume()? {
        bail!(
            "--resume: {} holds no checkpoint to resume; start a new run without --resume",
            out.display()
        );
    }
    // Rank 0 records what produces this run (RUN/record.jsonl): a `running` line now, the
    // outcome when `fit` returns.
    let mut record = (rank == 0).then(|| {
        selfsup_train::record::Record::start(
            "train",
            crate::build_info(),
            selfsup_train::record::config_json(&cfg),
            dataset_id(&cfg.dataset, &cfg.data_dir),
            world,
        )
    });
    let record_path = out.join(selfsup_train::record::FILE);
    if let Some(r) = &record {
        r.append(&record_path)?;
    }
    let fitted = t.fit(a.stop_after);
    if let Some(r) = record.as_mut() {
        let (status, results) = match &fitted {
            Ok(s) => (
                "done".to_string(),
                serde_json::json!({
                    "epochs": s.epochs, "steps": s.steps, "last_loss": s.last_loss,
                    "images_per_s": s.images_per_s, "data_wait": s.data_wait,
                    "knn_top1": s.knn.iter().map(|k| serde_json::json!({"epoch": k.0, "top1": k.1})).collect::<Vec<_>>(),
                }),
            ),
            Err(selfsup_train::Error::Interrupted { .. }) => {
                ("interrupted".to_string(), serde_json::Value::Null)
            }
            Err(e) => (format!("failed: {e}"), serde_json::Value::Null),
        };
        r.finish(&status, results);
        if let Err(e) = r.append(&record_path) {
            tracing::warn!("could not write the run record: {e}");
        }
    }
    let s = fitted?;
    if rank != 0 {
        return Ok(());
    }
    println!(
        "done: {} epochs, {} steps, loss {:.4}, {:.0} images/s, data wait {:.1}%{}; checkpoint in {}",
        s.epochs,
        s.steps,
        s.last_loss.unwrap_or(f64::NAN),
        s.images_per_s,
        100.0 * s.data_wait,
        s.knn.last().map(|k| format!(", kNN top-1 {:.2}%", 100.0 * k.1)).unwrap_or_default(),
        out.join(checkpoint::DIR).display()
    );
    Ok(())
}
