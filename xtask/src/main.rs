//! `cargo xtask`: project automation (data download, test matrix, benchmarks).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod bench_dist;
mod cuda;

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
    /// Install the pinned CUDA 13.0 toolkit from PyPI into DIR (nvcc, runtime, cuBLAS, cuRAND,
    /// NVRTC, cuDNN, NCCL; a libcuda stub for linking), for the CUDA build (docs/cuda.md).
    CudaToolkit {
        /// Toolkit folder.
        #[arg(long, default_value = cuda::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Build the CUDA bundle: release `selfsup` (cuda, cudnn), `xtask` (bench), the CUDA test
    /// binaries, stripped, and run.sh, as OUT.tar.zst (for a GPU machine without Rust).
    CudaBundle {
        /// Toolkit folder (installed when missing).
        #[arg(long, default_value = cuda::DEFAULT_DIR)]
        toolkit: PathBuf,
        /// Bundle folder; the archive is OUT.tar.zst beside it.
        #[arg(long, default_value = "target/selfsup-cuda")]
        out: PathBuf,
        /// Also ship a CIFAR-10 subset from this data dir (N training and N/5 test images, in
        /// the official layout) for run.sh's short cifar10-gpu run.
        #[arg(long)]
        cifar_from: Option<PathBuf>,
        /// Training images in that subset (the bundle must stay under 64 MiB).
        #[arg(long, default_value_t = 5_000)]
        cifar_images: usize,
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

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Why the CUDA tests cannot run here, if they cannot (no GPU).
fn gpu_missing() -> Option<String> {
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success());
    match smi {
        Some(_) => None,
        None => Some("no NVIDIA GPU here (nvidia-smi -L failed)".into()),
    }
}

fn test(device: Device) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let features: &[&str] = match device {
        Device::Cpu => &[],
        Device::Cuda => {
            // Builds with the pinned toolkit (installed when missing); runs the tests when a
            // GPU is here, else says what it built.
            return cuda::test(std::path::Path::new(cuda::DEFAULT_DIR), gpu_missing());
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
        Cmd::CudaToolkit { dir } => cuda::install(&dir).map(|_| ()),
        Cmd::CudaBundle {
            toolkit,
            out,
            cifar_from,
            cifar_images,
        } => cuda::bundle(&toolkit, &out, cifar_from.as_deref(), cifar_images),
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
