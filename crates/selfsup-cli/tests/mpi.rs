//! `selfsup train` under `mpirun -np 2` (the `mpi` feature; `cargo xtask test` runs these when
//! an MPI launcher is installed): 2 ranks equal 1 process, resume under 2 ranks is bit-identical,
//! a killed rank stops the job.
#![cfg(feature = "mpi")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::DType;

mod common;

use common::{assert_ok, assert_same_training, losses, model, setup, train_args, BIN};

/// `mpirun -np n selfsup ...`, allowed to run as root and on more ranks than cores (CI).
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &n.to_string(),
    ])
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("OMPI_MCA_mpi_yield_when_idle", "1")
    .arg(BIN);
    c
}

fn two_ranks_equal_one(method: &str) {
    let d = setup();
    let imgs = d.path().join("imgs");
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    let out = Command::new(BIN)
        .args(train_args(&imgs, &one, method, 2))
        .args(["--dist", "single", "--sync-bn"])
        .output()
        .unwrap();
    assert_ok(&out);
    let out = mpirun(2)
        .args(train_args(&imgs, &two, method, 2))
        .arg("--sync-bn")
        .output()
        .unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1 of 2 (mpi): 8 images per rank"),
        "{err}"
    );
    // Only rank 0 reports.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("done:")
            .count(),
        1
    );
    assert_same_training(method, &one, &two, "2 ranks");
}

#[test]
fn simclr_on_two_mpi_ranks_equals_one_process() {
    two_ranks_equal_one("simclr");
}

#[test]
fn moco_on_two_mpi_ranks_equals_one_process() {
    two_ranks_equal_one("moco");
}

#[test]
fn resume_under_two_ranks_is_bit_identical() {
    let d = setup();
    let imgs = d.path().join("imgs");
    let (straight, resumed) = (d.path().join("straight"), d.path().join("resumed"));
    assert_ok(
        &mpirun(2)
            .args(train_args(&imgs, &straight, "simclr", 2))
            .output()
            .unwrap(),
    );
    let out = mpirun(2)
        .args(train_args(&imgs, &resumed, "simclr", 2))
        .args(["--stop-after", "1"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 1 epochs"));
    let out = mpirun(2)
        .args(train_args(&imgs, &resumed, "simclr", 2))
        .arg("--resume")
        .output()
        .unwrap();
    assert_ok(&out);
    let (a, b) = (model(&straight), model(&resumed));
    for (name, t) in &a {
        let same = t
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            == b[name]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
        assert!(same, "{name} differs after resuming under 2 ranks");
    }
    assert_eq!(losses(&straight), losses(&resumed));
}

/// The PID of rank `rank` among the processes whose command line mentions `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains(marker) || !cmd.starts_with(BIN) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_stops_the_job_within_a_minute() {
    let d = setup();
    let imgs = d.path().join("imgs");
    let run = d.path().join("killed-run");
    let mut child = mpirun(2)
        .args(train_args(&imgs, &run, "simclr", 500))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the ranks train (a first checkpoint is written), then kill rank 1.
    let t0 = Instant::now();
    while !run.join("checkpoint/state.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(run.to_str().unwrap(), 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the job still runs a minute after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !status.success(),
        "the job reported success after losing a rank"
    );
    assert!(
        rank_pid(run.to_str().unwrap(), 0).is_none(),
        "rank 0 outlived the job"
    );
    // What is in the run folder is complete: the checkpoint loads, every metrics line but a
    // possibly cut last one parses.
    assert!(!model(&run).is_empty());
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = m.lines().collect();
    for l in &lines[..lines.len().saturating_sub(1)] {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(st["world_size"], 2);
}
