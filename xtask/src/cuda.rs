//! The CUDA build on machines without CUDA: a pinned CUDA 13.0 toolkit from PyPI
//! (`cargo xtask cuda-toolkit`), the `--features cuda` build and test binaries
//! (`cargo xtask test --device cuda`), and a bundle to run them on a GPU machine that has a
//! driver but no Rust (`cargo xtask cuda-bundle`).
//!
//! Why PyPI: it is reachable here (Debian's `nvidia-cuda-toolkit` is 11.8 and sits in non-free,
//! not enabled), and NVIDIA publishes nvcc and every library as wheels. Why 13.0: the GPU
//! machines run a driver of the 580 series (CUDA 13.0), and PTX from a newer nvcc does not load
//! there. The wheels carry no `libcuda.so` (the driver's library); the toolkit folder gets a
//! link-time stub built from the driver symbols cudarc can call, and the real one comes from
//! the driver at run time. Details: docs/cuda.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// The wheels, pinned to CUDA 13.0 (nvcc, runtime, headers, NVVM and the libraries candle links:
/// cuBLAS, cuRAND, NVRTC; cuDNN and NCCL for the `cudnn` build and a future NCCL communicator).
/// `nvidia-nvvm` must be pinned: unpinned, pip brings 13.5's, whose PTX 13.0 rejects.
pub const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cudnn-cu13==9.13.0.50",
    "nvidia-nccl-cu13==2.27.7",
];

/// H100 / H200.
pub const COMPUTE_CAP: &str = "90";

/// Default toolkit folder (inside `target/`, so never in git).
pub const DEFAULT_DIR: &str = "target/cuda-13.0";

/// Where the CUDA build goes (its own target folder: the CPU build stays as it is).
pub const TARGET_DIR: &str = "target/cuda";

/// An installed toolkit.
pub struct Toolkit {
    /// `.../site-packages/nvidia`.
    nvidia: PathBuf,
}

impl Toolkit {
    /// `nvidia/cu13`: `bin/nvcc`, `include/`, `lib/`.
    fn cu(&self) -> PathBuf {
        self.nvidia.join("cu13")
    }

    /// A toolkit installed in `dir` earlier, if there is one.
    pub fn find(dir: &Path) -> Option<Self> {
        // Absolute: build scripts run in their own package folders.
        let nvidia =
            std::path::absolute(site_packages(&dir.join("venv")).ok()?.join("nvidia")).ok()?;
        let t = Self { nvidia };
        let lib = t.cu().join("lib");
        (t.cu().join("bin/nvcc").is_file()
            && lib.join("stubs/libcuda.so").is_file()
            && ["libcublas.so", "libcurand.so", "libnvrtc.so", "libcudnn.so"]
                .iter()
                .all(|l| lib.join(l).exists()))
        .then_some(t)
    }

    /// The environment a cargo build needs: nvcc on PATH, CUDA_ROOT for cudarc's and
    /// candle-kernels' build scripts, the compute capability, the CUDA version, the libraries.
    pub fn env(&self) -> Vec<(String, String)> {
        let cu = self.cu().display().to_string();
        let path = format!("{cu}/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut v: Vec<(String, String)> = vec![
            ("PATH".into(), path),
            ("CUDA_ROOT".into(), cu.clone()),
            ("CUDA_PATH".into(), cu.clone()),
            ("CUDA_HOME".into(), cu.clone()),
            ("CUDA_COMPUTE_CAP".into(), COMPUTE_CAP.into()),
            ("CUDARC_CUDA_VERSION".into(), "13000".into()),
            (
                "CARGO_TARGET_DIR".into(),
                std::path::absolute(TARGET_DIR)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| TARGET_DIR.into()),
            ),
        ];
        v.push(("LIBRARY_PATH".into(), format!("{cu}/lib:{cu}/lib/stubs")));
        v
    }
}

fn site_packages(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    let py = std::fs::read_dir(&lib)
        .with_context(|| format!("{}", lib.display()))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))
        .context("no python folder in the virtual environment")?;
    Ok(py.path().join("site-packages"))
}

/// Every CUDA driver function cudarc may call (its `load::<_F>("cu...")` names, any CUDA
/// version), for the stub.
fn driver_symbols() -> Result<Vec<String>> {
    cudarc_symbols("driver", "cu")
}

/// The functions of cudarc's `src/MODULE/sys/mod.rs` whose names start with `prefix`.
fn cudarc_symbols(module: &str, prefix: &str) -> Result<Vec<String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "selfsup-cli/cuda",
        ])
        .output()
        .context("cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph (run `cargo fetch`)")?;
    let src = Path::new(manifest).with_file_name(format!("src/{module}/sys/mod.rs"));
    let text = std::fs::read_to_string(&src).with_context(|| format!("{}", src.display()))?;
    let mut names: Vec<String> = text
        .split("load::<_F>(\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    if names.len() < 20 {
        bail!(
            "found only {} driver symbols in {}",
            names.len(),
            src.display()
        );
    }
    Ok(names)
}

/// Install the pinned wheels into `dir/venv` (pip, idempotent), link the libraries under the
/// names the linker looks for, and build the `libcuda.so` stub.
pub fn install(dir: &Path) -> Result<Toolkit> {
    let venv = dir.join("venv");
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(WHEELS))?;
    let nvidia = std::path::absolute(site_packages(&venv)?.join("nvidia"))?;
    let t = Toolkit { nvidia };
    let lib = t.cu().join("lib");
    // Wheels ship `libX.so.N` only; the linker wants `libX.so`.
    let mut linked = Vec::new();
    for dir in [
        lib.clone(),
        t.nvidia.join("cudnn/lib"),
        t.nvidia.join("nccl/lib"),
    ] {
        for e in std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((base, _)) = name.split_once(".so.") else {
                continue;
            };
            let link = lib.join(format!("{base}.so"));
            // A link that does not resolve (an earlier run's) is made again.
            if link.symlink_metadata().is_ok() && !link.exists() {
                std::fs::remove_file(&link)?;
            }
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(std::path::absolute(e.path())?, &link)
                    .with_context(|| format!("{}", link.display()))?;
                linked.push(base.to_string());
            }
        }
    }
    // The driver library's stub: every symbol returns CUDA_ERROR_STUB_LIBRARY (34); the
    // binaries record `libcuda.so.1` and get the driver's at run time.
    let stubs = lib.join("stubs");
    std::fs::create_dir_all(&stubs)?;
    let symbols = driver_symbols()?;
    let c: String = symbols
        .iter()
        .map(|s| format!("int {s}(void) {{ return 34; }}\n"))
        .collect();
    let c_file = stubs.join("libcuda_stub.c");
    std::fs::write(&c_file, c)?;
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(stubs.join("libcuda.so"))
        .arg(&c_file))?;
    let nvcc = Command::new(t.cu().join("bin/nvcc"))
        .arg("--version")
        .output()?;
    let version = String::from_utf8_lossy(&nvcc.stdout);
    println!(
        "CUDA toolkit in {}: {}; {} library links made; libcuda stub with {} symbols",
        dir.display(),
        version.lines().last().unwrap_or_default(),
        linked.len(),
        symbols.len()
    );
    println!("build with: cargo xtask test --device cuda   (or cargo xtask cuda-bundle)");
    Ok(t)
}

/// The toolkit in `dir`, installing it when missing.
pub fn toolkit(dir: &Path) -> Result<Toolkit> {
    match Toolkit::find(dir) {
        Some(t) => Ok(t),
        None => install(dir),
    }
}

/// A cargo command with the toolkit's environment.
fn cargo(t: &Toolkit) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.envs(t.env());
    c
}

/// Test executables of a `cargo test --no-run --message-format json` run.
fn test_executables(t: &Toolkit, features: &str) -> Result<Vec<PathBuf>> {
    let out = cargo(t)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format",
            "json",
        ])
        .args(["--features", features])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the CUDA test binaries failed");
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == true {
            if let Some(e) = v["executable"].as_str() {
                exes.push(PathBuf::from(e));
            }
        }
    }
    exes.sort();
    exes.dedup();
    Ok(exes)
}

/// `cargo xtask test --device cuda`: clippy and the test binaries with `--features cuda`; runs
/// them when a GPU is present, else says what was built and where.
pub fn test(dir: &Path, gpu: Option<String>) -> Result<()> {
    let t = toolkit(dir)?;
    run(cargo(&t)
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--features",
            "cuda",
        ])
        .args(["--", "-D", "warnings"]))?;
    let exes = test_executables(&t, "cuda")?;
    match gpu {
        None => {
            run(cargo(&t).args(["test", "--workspace", "--features", "cuda"]))?;
        }
        Some(why) => {
            println!(
                "built {} CUDA test binaries (not run: {why}) in {}:",
                exes.len(),
                Path::new(TARGET_DIR).join("debug/deps").display()
            );
            for e in &exes {
                println!("  {}", e.display());
            }
            println!(
                "run them on a GPU machine: cargo xtask cuda-bundle, then BUNDLE/run.sh there"
            );
        }
    }
    Ok(())
}

/// The run script of the bundle (see docs/cuda.md).
const RUN_SH: &str = include_str!("../scripts/cuda_bundle_run.sh");

/// `cargo xtask cuda-bundle`: the release `selfsup` with `cuda,cudnn`, the CUDA test binaries
/// of the crates that run on a device, stripped, with a run script, as `OUT.tar.zst`.
pub fn bundle(
    dir: &Path,
    out: &Path,
    cifar_from: Option<&Path>,
    cifar_images: usize,
) -> Result<()> {
    let t = toolkit(dir)?;
    run(cargo(&t).args([
        "build",
        "--release",
        "-p",
        "selfsup-cli",
        "-p",
        "xtask",
        "--features",
        "selfsup-cli/cuda,selfsup-cli/cudnn,xtask/cuda",
    ]))?;
    let exes = test_executables(&t, "cuda")?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out.join("bin"))?;
    std::fs::create_dir_all(out.join("tests"))?;
    let release = Path::new(TARGET_DIR).join("release");
    for b in ["selfsup", "xtask"] {
        strip_into(&release.join(b), &out.join("bin").join(b))?;
    }
    // The crates whose tests take a device (SELFSUP_TEST_DEVICE): one binary each.
    let wanted = ["cuda-"];
    let mut kept = Vec::new();
    for e in &exes {
        let name = e.file_name().unwrap().to_string_lossy().to_string();
        if wanted.iter().any(|w| name.starts_with(w)) {
            let stem = name.rsplit_once('-').map_or(name.as_str(), |(s, _)| s);
            strip_into(e, &out.join("tests").join(stem))?;
            kept.push(stem.to_string());
        }
    }
    if let Some(from) = cifar_from {
        cifar_subset(from, &out.join("data"), cifar_images)?;
    }
    curand_fallback(&out.join("lib-fallback"))?;
    std::fs::write(out.join("run.sh"), RUN_SH)?;
    set_executable(&out.join("run.sh"))?;
    let parent = out.parent().unwrap_or(Path::new("."));
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    let tar = parent.join(format!("{name}.tar.zst"));
    run(Command::new("tar")
        .arg("-C")
        .arg(parent)
        .args(["--use-compress-program", "zstd -19 -T0", "-cf"])
        .arg(&tar)
        .arg(&name))?;
    let size = std::fs::metadata(&tar)?.len();
    println!(
        "bundle {} ({:.1} MiB): bin/selfsup, bin/xtask, tests/{{{}}}, run.sh",
        tar.display(),
        size as f64 / 1048576.0,
        kept.join(", ")
    );
    if size > 64 << 20 {
        bail!("the bundle is over 64 MiB");
    }
    Ok(())
}

/// The first `n` training images (five batch files of `n / 5`) and the first `n / 5` test images
/// of the CIFAR-10 in `from`, in the official layout under `to`.
fn cifar_subset(from: &Path, to: &Path, n: usize) -> Result<()> {
    use selfsup_data::cifar;
    let train = cifar::load(from, cifar::Split::Train)?;
    let test = cifar::load(from, cifar::Split::Test)?;
    let dir = to.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&dir)?;
    let per = (n / 5).clamp(1, 10_000);
    let write =
        |ds: &selfsup_data::InMemory, start: usize, count: usize, file: &str| -> Result<()> {
            let px = &ds.pixels[start * 3072..(start + count) * 3072];
            let labels = &ds.labels.as_ref().context("CIFAR-10 labels")?[start..start + count];
            cifar::write_batch(&dir.join(file), px, labels)?;
            Ok(())
        };
    for (i, f) in cifar::TRAIN_FILES.iter().enumerate() {
        write(&train, i * per, per, f)?;
    }
    write(&test, 0, per, cifar::TEST_FILE)?;
    std::fs::write(dir.join(cifar::META_FILE), cifar::CLASSES.join("\n"))?;
    println!(
        "CIFAR-10 subset: {} training and {per} test images from {}",
        5 * per,
        from.display()
    );
    Ok(())
}

/// A `libcurand.so.10` for machines without cuRAND (PyTorch's CUDA 13 wheels do not bring it,
/// and the real one, 43 MiB compressed, does not fit the bundle): creating, seeding and
/// destroying a generator succeed (candle makes one per device), every draw fails with
/// CURAND_STATUS_INTERNAL_ERROR, so device-side random numbers error loudly instead of
/// returning garbage. selfsup draws its random numbers on the CPU. run.sh puts it last on the
/// library path: a real cuRAND wins.
fn curand_fallback(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ok = |n: &str| {
        n.starts_with("curandCreate")
            || n.starts_with("curandDestroy")
            || n.starts_with("curandSet")
            || n == "curandGenerateSeeds"
    };
    let c: String = cudarc_symbols("curand", "curand")?
        .iter()
        .map(|s| {
            format!(
                "int {s}(void) {{ return {}; }}\n",
                if ok(s) { 0 } else { 999 }
            )
        })
        .collect();
    let c_file = dir.join("curand_fallback.c");
    std::fs::write(&c_file, c)?;
    // The real library versions its symbols `libcurand.so.10`, and the binaries ask for that.
    let map = dir.join("curand_fallback.map");
    std::fs::write(&map, "libcurand.so.10 { global: *; };\n")?;
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcurand.so.10"])
        .arg(format!("-Wl,--version-script={}", map.display()))
        .arg("-o")
        .arg(dir.join("libcurand.so.10"))
        .arg(&c_file))?;
    std::fs::remove_file(&c_file)?;
    std::fs::remove_file(&map)?;
    Ok(())
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(from)
        .arg(to))?;
    set_executable(to)
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
