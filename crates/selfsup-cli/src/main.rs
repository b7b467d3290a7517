//! `selfsup`: pretrain an image encoder without labels, evaluate it, and use its features.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::TrainArgs;
use embed::EmbedArgs;
use eval::EvalCmd;
use neighbors::NeighborsArgs;

#[global_allocator]
static GLOBAL: selfsup_alloc::Allocator = selfsup_alloc::Allocator;

mod config;
mod data;
mod embed;
mod encoder;
mod eval;
mod lowlabel;
mod neighbors;
mod plot;
mod presets;
mod progress;
mod train;

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
/// This binary's version and source commit, for run records (see build.rs).
pub(crate) fn build_info() -> selfsup_train::record::Build {
    selfsup_train::record::Build {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("SELFSUP_GIT_COMMIT"),
        dirty: env!("SELFSUP_GIT_DIRTY") == "true",
    }
}

pub(crate) fn set_threads(n: usize) {
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

fn main() -> ExitCode {
    selfsup_alloc::keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Train(a) => train::train(a),
        Cmd::Eval { what } => eval::eval(what),
        Cmd::Embed(a) => embed::embed(a),
        Cmd::Neighbors(a) => neighbors::neighbors_cmd(a),
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
