//! `selfsup`: pretrain an image encoder without labels, evaluate it, and use its features.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use selfsup_data::{
    cifar, folder, preset_views, InMemory, Loader, LoaderConfig, Normalize, Preset,
};
use selfsup_eval::{extract_features, knn, linear_probe, KnnConfig, LinearProbeConfig};
use selfsup_methods::GreyInput;
use selfsup_models::{build_encoder, io, seeded_var_builder, Encoder, EncoderKind};
use selfsup_train::setup::{build_trainer_dist, check_method_name, inference_encoder, RunData};
use selfsup_train::{checkpoint, parse_device, TrainConfig};

// mimalloc keeps freed pages for reuse: candle allocates a fresh buffer per op, and with the
// system allocator a quarter of a training step went to page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 in both its v2 and v3 option enums; the sys
/// crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the OS. By default mimalloc purges pages unused for 10 ms,
/// and every training step then re-faults (and the kernel re-zeroes) the same few hundred MiB
/// of activations: a third of the small-cnn step's samples sat in `clear_page`. Keeping the
/// pages made the small-cnn step about 1.3x faster (docs/benchmarks.md) for a peak RSS within
/// 10% of before.
/// `MIMALLOC_PURGE_DELAY` in the environment still overrides this default.
fn keep_freed_pages() {
    // SAFETY: sets a process-wide allocator option; called first thing in `main`, and mimalloc
    // documents options as settable at any time.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) }
}

mod lowlabel;
mod neighbors;
mod plot;
mod presets;

#[derive(Parser)]
#[command(
    name = "selfsup",
    version,
    about = "Self-supervised pretraining of image encoders (SimCLR, ...) on candle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pretrain an encoder without labels (fetches CIFAR-10 on first use).
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint's frozen encoder on CIFAR-10.
    Eval {
        #[command(subcommand)]
        what: EvalCmd,
    },
    /// Export the features of a dataset as (N, D) f32 (`.safetensors` with labels, or `.npy`).
    Embed(EmbedArgs),
    /// A PNG of a query image and its nearest neighbours in the CIFAR-10 training set.
    Neighbors(NeighborsArgs),
    /// Draw a run's loss, kNN accuracy and embedding spread over time as a PNG
    /// (several runs: one colour each).
    Plot {
        /// Run folders (or metrics.jsonl files).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output PNG (default: RUN/metrics.png for a single run).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Options of `selfsup train`. Each one also lives in the TOML config (same name, `_` for `-`);
/// flags override the config file, which overrides the preset.
#[derive(Args, Default)]
struct TrainArgs {
    /// Method: simclr, moco, byol, simsiam, barlow, vicreg, pairs, rotation, colorization; a
    /// hybrid such as simclr+rotation (contrastive + pretext, see --aux-weight); or, using the
    /// labels: supcon, supervised (and pairs with --pair-labels). Each sets its own defaults
    /// (temperature, head widths, momentum, augmentation), see docs/methods.md.
    #[arg(long)]
    method: Option<String>,
    /// Encoder: small-cnn, resnet18, resnet34, resnet50 (-cifar / -imagenet stem, -wN width), convnet-seed.
    #[arg(long)]
    encoder: Option<String>,
    /// cifar10 or folder:PATH (root/<class>/*.png for labels, or a flat folder).
    #[arg(long)]
    dataset: Option<String>,
    /// Where CIFAR-10 is (or is downloaded to).
    #[arg(long)]
    data_dir: Option<String>,
    /// CIFAR-10 archive URL or path for the first-use download (or $SELFSUP_CIFAR10_SOURCE).
    #[arg(long)]
    source: Option<String>,
    /// sha256 of --source.
    #[arg(long)]
    sha256: Option<String>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch (two views each).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// sgd, adamw or lars.
    #[arg(long)]
    optimizer: Option<String>,
    /// Weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Warmup epochs.
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Loss temperature (simclr, moco, supcon).
    #[arg(long)]
    temperature: Option<f64>,
    /// Augmentation: simclr_cifar, simclr_imagenet, byol, crop_flip, none.
    #[arg(long)]
    augment: Option<String>,
    /// Projection head hidden width.
    #[arg(long)]
    proj_hidden: Option<usize>,
    /// Projection output width.
    #[arg(long)]
    proj_out: Option<usize>,
    /// Predictor hidden width (byol, simsiam).
    #[arg(long)]
    pred_hidden: Option<usize>,
    /// Target-network momentum at the start (moco, byol).
    #[arg(long)]
    momentum_tau: Option<f64>,
    /// Cosine schedule of the target momentum up to 1 (byol's default; true or false).
    #[arg(long)]
    momentum_cosine: Option<bool>,
    /// MoCo queue size (keys).
    #[arg(long)]
    queue_size: Option<usize>,
    /// MoCo symmetric loss (true or false).
    #[arg(long)]
    symmetric: Option<bool>,
    /// Weight of the pretext loss in a hybrid (simclr+rotation).
    #[arg(long)]
    aux_weight: Option<f64>,
    /// pairs: margin or triplet.
    #[arg(long)]
    pair_loss: Option<String>,
    /// pairs: margin of the loss.
    #[arg(long)]
    margin: Option<f64>,
    /// pairs: positives/negatives from labels too (uses labels; true or false).
    #[arg(long)]
    pair_labels: Option<bool>,
    /// colorization: bins (default, 16 per channel), bins:Q or regression.
    #[arg(long)]
    color_target: Option<String>,
    /// Seed for weights, data order and augmentations.
    #[arg(long)]
    seed: Option<u64>,
    /// Threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Run folder.
    #[arg(long)]
    out: Option<String>,
    /// Train on the first N images only.
    #[arg(long)]
    train_subset: Option<usize>,
    /// kNN monitor every N epochs (0: off).
    #[arg(long)]
    knn_every: Option<usize>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preset: cifar10-cpu or cifar10-gpu.
    #[arg(long)]
    preset: Option<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs of this call, checkpointed and resumable with --resume (for
    /// a cluster's time limit); the schedule stays that of --epochs.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Data-parallel world: auto (MPI when started by mpirun / srun), single, or mpi.
    /// --batch-size stays the global batch; each rank takes batch / ranks images.
    #[arg(long, default_value = "auto")]
    dist: String,
    /// Data-parallel runs: BatchNorm statistics over the global batch (SyncBatchNorm).
    #[arg(long)]
    sync_bn: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Weighted kNN (cosine, k = 200, T = 0.1) with the training set as memory bank.
    Knn {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Neighbours.
        #[arg(long, default_value_t = 200)]
        k: usize,
        /// Vote temperature.
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
    },
    /// Linear probe on frozen features: top-1 and top-5.
    Linear {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Epochs over the features.
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        /// AdamW learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Also report kNN (k = 200, T = 0.1) on the same features (one extraction for both).
        #[arg(long)]
        knn: bool,
    },
    /// Low-label protocol: with 1% and 10% of the labels (balanced, seeded), a linear probe and
    /// fine-tuning of the pretrained encoder beside the same supervised training from scratch.
    LowLabel {
        #[command(flatten)]
        ck: CheckpointArgs,
        /// Fractions of the training labels.
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.1")]
        fractions: Vec<f64>,
        /// Supervised epochs over each subset (fine-tuning and scratch alike).
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// SGD learning rate.
        #[arg(long, default_value_t = 0.05)]
        lr: f64,
        /// Seed of the subsets and the training.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for the supervised runs.
        #[arg(long, default_value = "runs/low-label")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct CheckpointArgs {
    /// Run folder, checkpoint folder, or encoder.safetensors.
    #[arg(long, required_unless_present = "baseline")]
    checkpoint: Option<PathBuf>,
    /// Evaluate a baseline instead of a checkpoint: `random` (a freshly initialised --encoder,
    /// seed 0) or `pixels` (the normalised pixels themselves as features).
    #[arg(long, conflicts_with = "checkpoint")]
    baseline: Option<String>,
    /// Encoder name, when the checkpoint has no config.toml beside it.
    #[arg(long)]
    encoder: Option<String>,
    /// Where CIFAR-10 is.
    #[arg(long, default_value = "data")]
    data_dir: String,
    /// Threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What the encoder is fed: `auto` (the input it trained on: grey images for a
    /// colorization run, colour for every other), `colour`, or `grey` (CIELAB lightness on
    /// three channels, as colorization trains on; e.g. `--baseline random --input grey`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "colour", "grey"])]
    input: String,
}

#[derive(Args)]
struct NeighborsArgs {
    #[command(flatten)]
    ck: CheckpointArgs,
    /// An image file, or `cifar10-test:INDEX`.
    #[arg(long)]
    query: String,
    /// Neighbours to show.
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    ck: CheckpointArgs,
    /// cifar10-train, cifar10-test or folder:PATH.
    #[arg(long)]
    data: String,
    /// Output file: .safetensors (embeddings + labels) or .npy (embeddings).
    #[arg(long)]
    out: PathBuf,
}

fn set_threads(n: usize) {
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

fn effective_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::default();
    if let Some(p) = &a.preset {
        cfg = presets::preset(p)?;
    }
    let file = match &a.config {
        Some(path) => Some((
            path,
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => None,
    };
    // The method's own defaults go under the config file and the flags.
    let file_method = file.as_ref().and_then(|(_, s)| {
        toml::from_str::<toml::Table>(s)
            .ok()
            .and_then(|t| t.get("method").and_then(|m| m.as_str().map(String::from)))
    });
    let method = a
        .method
        .clone()
        .or(file_method)
        .unwrap_or_else(|| cfg.method.clone());
    check_method_name(&method)?;
    cfg.apply_method_defaults(&method);
    if let Some((path, s)) = &file {
        cfg = merge_toml(&cfg, s).with_context(|| format!("{}", path.display()))?;
    }
    if a.resume {
        // The run's own configuration (or its checkpoint's), not the preset's or the file's;
        // flags that would make it another run are refused.
        let out = a.out.clone().unwrap_or_else(|| cfg.out.clone());
        let run = Path::new(&out);
        let candidates = [
            Some(run.join("config.toml")),
            checkpoint::latest(run).map(|d| d.join("config.toml")),
        ];
        if let Some((path, s)) = candidates
            .into_iter()
            .flatten()
            .find_map(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)))
        {
            cfg = TrainConfig::from_toml(&s).with_context(|| format!("{}", path.display()))?;
            let differs = |flag: &str, given: Option<String>, saved: String| -> Result<()> {
                match given {
                    Some(g) if g != saved => bail!(
                        "--resume: --{flag} {g} is not the run's {saved} ({}); another {flag} is a new run",
                        path.display()
                    ),
                    _ => Ok(()),
                }
            };
            differs("method", a.method.clone(), cfg.method.clone())?;
            differs("encoder", a.encoder.clone(), cfg.encoder.clone())?;
            differs(
                "dataset",
                a.dataset.as_deref().map(absolute_dataset).transpose()?,
                absolute_dataset(&cfg.dataset)?,
            )?;
            differs(
                "batch-size",
                a.batch_size.map(|v| v.to_string()),
                cfg.batch_size.to_string(),
            )?;
            differs("seed", a.seed.map(|v| v.to_string()), cfg.seed.to_string())?;
        }
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { cfg.$f = v.clone().into(); } )* };
    }
    set!(
        method,
        encoder,
        dataset,
        data_dir,
        source,
        sha256,
        epochs,
        batch_size,
        lr,
        weight_decay,
        warmup_epochs,
        temperature,
        seed,
        threads,
        device,
        out,
        train_subset,
        knn_every,
        augment,
        proj_hidden,
        proj_out,
        pred_hidden,
        momentum_tau,
        momentum_cosine,
        queue_size,
        symmetric,
        aux_weight,
        pair_loss,
        margin,
        pair_labels,
        color_target
    );
    if let Some(o) = &a.optimizer {
        cfg.optimizer = o.parse()?;
    }
    if a.sync_bn {
        cfg.sync_bn = true;
    }
    cfg.validate()?;
    check_method_name(&cfg.method)?;
    cfg.encoder.parse::<EncoderKind>()?;
    Ok(cfg)
}

/// Apply the keys of a TOML document over `base`.
fn merge_toml(base: &TrainConfig, s: &str) -> Result<TrainConfig> {
    let mut v: toml::Table = toml::from_str(&base.to_toml())?;
    let over: toml::Table = toml::from_str(s).context("not valid TOML")?;
    for (k, x) in over {
        v.insert(k, x);
    }
    Ok(TrainConfig::from_toml(&toml::to_string(&v)?)?)
}

fn load_cifar(cfg_data_dir: &str, source: &str, sha256: &str) -> Result<(InMemory, InMemory)> {
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

fn load_folder(path: &str, size: usize) -> Result<InMemory> {
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

fn run_data(cfg: &TrainConfig) -> Result<RunData> {
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

fn train(a: &TrainArgs) -> Result<()> {
    let mode: selfsup_dist::Mode = a.dist.parse()?;
    let comm = selfsup_dist::init(mode)?;
    let r = train_on(a, comm.clone());
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

/// `folder:PATH` with an absolute path (other dataset names as they are), so that a run's saved
/// configuration resumes from any working directory.
fn absolute_dataset(d: &str) -> Result<String> {
    Ok(match d.strip_prefix("folder:") {
        Some(p) => format!("folder:{}", std::path::absolute(p)?.display()),
        None => d.to_string(),
    })
}

/// Local paths of a new run's configuration made absolute (see [`absolute_dataset`]).
fn absolute_paths(cfg: &mut TrainConfig) -> Result<()> {
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
pub(crate) const RUN_FILES: [&str; 7] = [
    "config.toml",
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
fn total_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Threads per rank when `--threads 0`: the machine's cores shared by the ranks on this node.
fn threads_per_rank(world: usize) -> usize {
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

fn train_on(a: &TrainArgs, comm: selfsup_dist::Comm) -> Result<()> {
    let mut cfg = effective_config(a)?;
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (rank, world) = (comm.rank(), comm.world_size());
    if !a.resume {
        absolute_paths(&mut cfg)?;
    }
    if world > 1 && cfg.threads == 0 {
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
    let need = selfsup_train::setup::estimated_peak_bytes(&cfg, world)?;
    if let Some(have) = total_memory_bytes() {
        if need > have as f64 {
            bail!(
                "this run needs about {:.1} GiB per process (encoder {}, image size {}, batch {} per rank), more than the machine's {:.1} GiB",
                need / 1073741824.0,
                cfg.encoder,
                cfg.image_size,
                cfg.batch_size / world,
                have as f64 / 1073741824.0
            );
        }
    }
    set_threads(cfg.threads);
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
    if let Some(lock) = lock {
        t.adopt_lock(lock);
    }
    if a.resume && !t.resume()? {
        bail!(
            "--resume: {} holds no checkpoint to resume; start a new run without --resume",
            out.display()
        );
    }
    let s = t.fit(a.stop_after)?;
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

/// Raw pixels as features: `(N, C, H, W) -> (N, C H W)`.
struct Pixels;

impl Encoder for Pixels {
    fn forward_t(&self, x: &Tensor, _train: bool) -> selfsup_models::Result<Tensor> {
        Ok(x.flatten_from(1)?)
    }
    fn feature_dim(&self) -> usize {
        3 * 32 * 32
    }
}

/// The encoder of a checkpoint as feature consumers call it, on images normalised with `norm`:
/// `--input auto` puts a grey input in front for a colorization run (the only input it
/// trained on); `colour` / `grey` choose for any encoder.
fn for_inference(
    enc: Box<dyn Encoder>,
    ck: &CheckpointArgs,
    cfg: &Option<TrainConfig>,
    norm: &Normalize,
) -> Box<dyn Encoder> {
    match (ck.input.as_str(), cfg) {
        ("grey", _) => Box::new(GreyInput::new(enc, norm.mean, norm.std)),
        ("auto", Some(c)) => inference_encoder(c, enc, norm),
        _ => enc,
    }
}

/// The encoder of a checkpoint (or a baseline), with its config when there is one.
fn load_encoder(
    ck: &CheckpointArgs,
    device: &Device,
) -> Result<(Box<dyn Encoder>, Option<TrainConfig>)> {
    match ck.baseline.as_deref() {
        Some("pixels") => return Ok((Box::new(Pixels), None)),
        Some("random") => {
            let name = ck.encoder.clone().unwrap_or_else(|| "small-cnn".into());
            let vm = candle_nn::VarMap::new();
            let enc = build_encoder(
                &name.parse()?,
                seeded_var_builder(&vm, 0, DType::F32, device),
            )?;
            return Ok((enc, None));
        }
        Some(b) => bail!("unknown baseline {b:?} (random or pixels)"),
        None => {}
    }
    let path = ck
        .checkpoint
        .clone()
        .expect("clap requires --checkpoint without --baseline");
    let dir = checkpoint::resolve(&path)?;
    let cfg = std::fs::read_to_string(dir.join("config.toml"))
        .ok()
        .map(|s| TrainConfig::from_toml(&s))
        .transpose()?;
    let name = match (&ck.encoder, &cfg) {
        (Some(e), _) => e.clone(),
        (None, Some(c)) => c.encoder.clone(),
        (None, None) => bail!(
            "{}: no config.toml beside the weights; pass --encoder NAME",
            dir.display()
        ),
    };
    let kind: EncoderKind = name.parse()?;
    let vm = candle_nn::VarMap::new();
    let enc = build_encoder(&kind, seeded_var_builder(&vm, 0, DType::F32, device))?;
    let file = if path.is_file() {
        path.clone()
    } else {
        dir.join("encoder.safetensors")
    };
    io::load_varmap(&vm, "", &file)
        .with_context(|| format!("loading {} as {name}", file.display()))?;
    Ok((enc, cfg))
}

pub(crate) fn eval_loader(
    ds: InMemory,
    size: usize,
    norm: Normalize,
    threads: usize,
) -> Result<Loader> {
    let lc = LoaderConfig {
        batch_size: 512,
        shuffle: false,
        drop_last: false,
        seed: 0,
        threads,
        prefetch: 2,
        shard: (0, 1),
    };
    Ok(Loader::new(
        Arc::new(ds),
        preset_views(Preset::None, size, norm),
        lc,
    )?)
}

fn cifar_features(ck: &CheckpointArgs) -> Result<(selfsup_eval::Features, selfsup_eval::Features)> {
    set_threads(ck.threads);
    let device = parse_device(&ck.device)?;
    let (enc, cfg) = load_encoder(ck, &device)?;
    let (src, sha) = cfg
        .as_ref()
        .map(|c| (c.source.clone(), c.sha256.clone()))
        .unwrap_or_default();
    let (train, test) = load_cifar(&ck.data_dir, &src, &sha)?;
    let enc = for_inference(enc, ck, &cfg, &Normalize::cifar10());
    let tr = extract_features(
        enc.as_ref(),
        &eval_loader(train, 32, Normalize::cifar10(), ck.threads)?,
        &device,
    )?;
    let te = extract_features(
        enc.as_ref(),
        &eval_loader(test, 32, Normalize::cifar10(), ck.threads)?,
        &device,
    )?;
    Ok((tr, te))
}

fn low_label(ck: &CheckpointArgs, ll: lowlabel::LowLabel) -> Result<()> {
    let (tr, te) = cifar_features(ck)?;
    let (train, test) = load_cifar(&ck.data_dir, "", "")?;
    let probe = ck.checkpoint.is_some().then_some((&tr, &te));
    lowlabel::run(&ll, &train, &test, probe)
}

fn eval(e: &EvalCmd) -> Result<()> {
    match e {
        EvalCmd::LowLabel {
            ck,
            fractions,
            epochs,
            batch_size,
            lr,
            seed,
            out,
        } => {
            let (encoder, weights) = match &ck.checkpoint {
                Some(p) => {
                    let dir = checkpoint::resolve(p)?;
                    let cfg = std::fs::read_to_string(dir.join("config.toml"))
                        .ok()
                        .map(|s| TrainConfig::from_toml(&s))
                        .transpose()?;
                    let enc = ck
                        .encoder
                        .clone()
                        .or(cfg.map(|c| c.encoder))
                        .context("pass --encoder: no config.toml beside the weights")?;
                    let file = if p.is_file() {
                        p.clone()
                    } else {
                        dir.join("encoder.safetensors")
                    };
                    (enc, Some(file))
                }
                None => (
                    ck.encoder.clone().unwrap_or_else(|| "small-cnn".into()),
                    None,
                ),
            };
            let ll = lowlabel::LowLabel {
                encoder,
                weights,
                fractions: fractions.clone(),
                epochs: *epochs,
                batch_size: *batch_size,
                lr: *lr,
                seed: *seed,
                threads: ck.threads,
                device: ck.device.clone(),
                out: out.clone(),
            };
            low_label(ck, ll)?;
        }
        EvalCmd::Knn { ck, k, temperature } => {
            let (tr, te) = cifar_features(ck)?;
            let (t1, t5) = knn(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                KnnConfig {
                    k: *k,
                    temperature: *temperature,
                },
            )?;
            println!(
                "kNN (k={k}, T={temperature}) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}%",
                100.0 * t1,
                100.0 * t5
            );
        }
        EvalCmd::Linear {
            ck,
            epochs,
            lr,
            knn: with_knn,
        } => {
            let (tr, te) = cifar_features(ck)?;
            if *with_knn {
                let (t1, t5) = knn(
                    &tr.x,
                    tr.labels.as_ref().unwrap(),
                    &te.x,
                    te.labels.as_ref().unwrap(),
                    10,
                    KnnConfig::default(),
                )?;
                println!(
                    "kNN (k=200, T=0.1) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}%",
                    100.0 * t1,
                    100.0 * t5
                );
            }
            let r = linear_probe(
                &tr.x,
                tr.labels.as_ref().unwrap(),
                &te.x,
                te.labels.as_ref().unwrap(),
                10,
                &LinearProbeConfig {
                    epochs: *epochs,
                    lr: *lr,
                    ..Default::default()
                },
            )?;
            println!("linear probe ({epochs} epochs) on CIFAR-10 test: top-1 {:.2}%, top-5 {:.2}% (train top-1 {:.2}%)", 100.0 * r.top1, 100.0 * r.top5, 100.0 * r.train_top1);
        }
    }
    Ok(())
}

fn embed(a: &EmbedArgs) -> Result<()> {
    set_threads(a.ck.threads);
    let device = parse_device(&a.ck.device)?;
    let (enc, cfg) = load_encoder(&a.ck, &device)?;
    let (ds, size, norm) = match a.data.as_str() {
        "cifar10-train" | "cifar10-test" => {
            let (src, sha) = cfg
                .as_ref()
                .map(|c| (c.source.clone(), c.sha256.clone()))
                .unwrap_or_default();
            let (tr, te) = load_cifar(&a.ck.data_dir, &src, &sha)?;
            (
                if a.data == "cifar10-train" { tr } else { te },
                32,
                Normalize::cifar10(),
            )
        }
        d if d.starts_with("folder:") => {
            let size = cfg.as_ref().map(|c| c.image_size).unwrap_or(32);
            (
                load_folder(&d["folder:".len()..], size)?,
                size,
                Normalize::imagenet(),
            )
        }
        d => bail!("unknown --data {d:?} (cifar10-train, cifar10-test, folder:PATH)"),
    };
    let enc = for_inference(enc, &a.ck, &cfg, &norm);
    let f = extract_features(
        enc.as_ref(),
        &eval_loader(ds, size, norm, a.ck.threads)?,
        &device,
    )?;
    // Never into a checkpoint or a run folder: `--out RUN/checkpoint/encoder.safetensors`
    // replaced the weights it was computed from.
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if parent.join("state.json").exists() || parent.join("metrics.jsonl").exists() {
        bail!(
            "--out {} is inside a run or checkpoint folder; write embeddings elsewhere",
            a.out.display()
        );
    }
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = a
        .out
        .with_extension(format!("tmp-{}.{ext}", std::process::id()));
    match ext {
        "safetensors" => {
            let mut m = std::collections::HashMap::new();
            m.insert("embeddings".to_string(), f.x.clone());
            if let Some(l) = &f.labels {
                m.insert(
                    "labels".to_string(),
                    Tensor::from_vec(
                        l.iter().map(|&x| x as u32).collect::<Vec<_>>(),
                        l.len(),
                        &Device::Cpu,
                    )?,
                );
            }
            io::save_tensors(&m, &a.out)?;
        }
        "npy" => {
            f.x.write_npy(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &a.out)
                .with_context(|| format!("cannot write {}", a.out.display()))?;
        }
        _ => bail!(
            "--out must end in .safetensors or .npy, got {}",
            a.out.display()
        ),
    }
    println!(
        "wrote {} embeddings of dimension {} to {}",
        f.x.dim(0)?,
        f.x.dim(1)?,
        a.out.display()
    );
    Ok(())
}

fn neighbors_cmd(a: &NeighborsArgs) -> Result<()> {
    set_threads(a.ck.threads);
    let device = parse_device(&a.ck.device)?;
    let (enc, cfg) = load_encoder(&a.ck, &device)?;
    let enc = for_inference(enc, &a.ck, &cfg, &Normalize::cifar10());
    let (train, test) = load_cifar(&a.ck.data_dir, "", "")?;
    let query = match a.query.strip_prefix("cifar10-test:") {
        Some(i) => {
            let i: usize = i
                .parse()
                .with_context(|| format!("bad index in {:?}", a.query))?;
            selfsup_data::Dataset::get(&test, i)?.image
        }
        None => folder::load_image(Path::new(&a.query), 32)?,
    };
    let bank = extract_features(
        enc.as_ref(),
        &eval_loader(train.clone(), 32, Normalize::cifar10(), a.ck.threads)?,
        &device,
    )?;
    let q = enc
        .features(&neighbors::query_tensor(&query, &Normalize::cifar10())?.to_device(&device)?)?
        .to_device(&Device::Cpu)?;
    let hits = neighbors::nearest(&bank, &q, a.k)?;
    neighbors::write_grid(&query, &train, &hits, 4, &a.out)?;
    let names = &train.class_names;
    let labels = train.label_vec().unwrap_or_default();
    let desc: Vec<String> = hits
        .iter()
        .map(|&(i, s)| {
            format!(
                "#{i} {} ({s:.3})",
                labels.get(i).map(|&l| names[l].as_str()).unwrap_or("?")
            )
        })
        .collect();
    println!("wrote {}: {}", a.out.display(), desc.join(", "));
    Ok(())
}

fn main() -> ExitCode {
    keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Eval { what } => eval(what),
        Cmd::Embed(a) => embed(a),
        Cmd::Neighbors(a) => neighbors_cmd(a),
        Cmd::Plot { runs, out } => plot::plot(runs, out.as_deref()).map(|p| {
            println!("{}", p.display());
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            match e.downcast_ref::<selfsup_train::Error>() {
                // The shell's code for "stopped by a signal".
                Some(selfsup_train::Error::Interrupted { .. }) => ExitCode::from(130),
                _ => ExitCode::from(2),
            }
        }
    }
}
