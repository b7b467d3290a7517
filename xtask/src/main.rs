//! `cargo xtask`: project automation (data download, test matrix, benchmarks).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod bench_dist;

#[global_allocator]
static GLOBAL: selfsup_alloc::Allocator = selfsup_alloc::Allocator;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "selfsup project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download (or copy), verify and extract CIFAR-10 into DATA_DIR/cifar-10-batches-bin.
    Cifar10 {
        /// URL or local path of cifar-10-binary.tar.gz (default: the official URL).
        #[arg(long, env = "SELFSUP_CIFAR10_SOURCE")]
        source: Option<String>,
        /// Expected sha256 of the archive (default: the official digest for the official URL).
        #[arg(long)]
        sha256: Option<String>,
        /// Where the data goes.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Run the test matrix: fmt, clippy and the workspace tests on a device.
    Test {
        /// cpu: default features; cuda: with `--features cuda`.
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
    },
    /// Benchmarks (results go to docs/benchmarks.md by hand, with the command).
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn cuda_available() -> Option<String> {
    let nvcc = Command::new("nvcc")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success());
    match (nvcc, smi) {
        (Some(_), Some(_)) => None,
        (None, _) => Some("no CUDA toolkit found (nvcc is not on PATH)".into()),
        (_, None) => Some("no NVIDIA GPU found (nvidia-smi -L failed)".into()),
    }
}

fn test(device: Device) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let features: &[&str] = match device {
        Device::Cpu => &[],
        Device::Cuda => {
            if let Some(why) = cuda_available() {
                bail!("cannot run the cuda matrix: {why}");
            }
            &["--features", "cuda"]
        }
    };
    run(Command::new(&cargo).args(["fmt", "--all", "--check"]))?;
    run(Command::new(&cargo)
        .args(["clippy", "--workspace", "--all-targets"])
        .args(features)
        .args(["--", "-D", "warnings"]))?;
    run(Command::new(&cargo)
        .args(["test", "--workspace"])
        .args(features))?;
    // Data-parallel tests: the `mpi` feature, the ranks started by mpirun.
    match mpi_missing() {
        None => {
            let mpi = ["--features", "selfsup-dist/mpi,selfsup-cli/mpi"];
            run(Command::new(&cargo)
                .args(["clippy", "-p", "selfsup-dist", "-p", "selfsup-cli", "--all-targets"])
                .args(mpi)
                .args(["--", "-D", "warnings"]))?;
            run(Command::new(&cargo)
                .args(["test", "-p", "selfsup-dist", "-p", "selfsup-cli", "--test", "mpi"])
                .args(mpi))?;
        }
        Some(why) if std::env::var_os("CI").is_some() => {
            bail!("the MPI tests cannot run: {why} (.ci/run installs openmpi-bin libopenmpi-dev libclang-dev)")
        }
        Some(why) => eprintln!(
            "MPI tests NOT run: {why}; install openmpi-bin libopenmpi-dev libclang-dev (Debian) to run them"
        ),
    }
    Ok(())
}

/// Why the MPI tests cannot run here, if they cannot.
fn mpi_missing() -> Option<String> {
    for (tool, arg) in [("mpirun", "--version"), ("mpicc", "--showme:version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` not found"));
        }
    }
    None
}

fn main() -> ExitCode {
    selfsup_alloc::keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Cifar10 {
            source,
            sha256,
            data_dir,
        } => {
            let opts = selfsup_data::download::FetchOptions {
                source,
                sha256,
                data_dir,
                progress: true,
                attempts: 3,
            };
            selfsup_data::download::fetch_cifar10(&opts)
                .map(|f| match f {
                    selfsup_data::download::Fetched::AlreadyPresent(p) => {
                        println!("CIFAR-10 already present and complete in {}", p.display())
                    }
                    selfsup_data::download::Fetched::Extracted(p) => {
                        println!("CIFAR-10 verified and extracted to {}", p.display())
                    }
                })
                .map_err(anyhow::Error::from)
        }
        Cmd::Test { device } => test(device),
        Cmd::Bench { what } => {
            if cfg!(debug_assertions) {
                // Benchmarks only mean something in release: run this command again there.
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let args: Vec<String> = std::env::args().skip(1).collect();
                run(Command::new(cargo)
                    .args(["run", "--release", "--package", "xtask", "--"])
                    .args(&args))
            } else {
                bench::run(what)
            }
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
