//! `selfsup train --ranks N`: data-parallel ranks as threads of one process (no MPI needed).
//! 2 ranks equal 1 process, resume under 2 ranks is bit-identical, bad settings and a failing
//! rank end the process with exit code 2 instead of hanging.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

mod common;

use common::{assert_ok, assert_same_training, losses, model, setup, train_args, BIN};

fn two_thread_ranks_equal_one(method: &str, extra: &[&str]) {
    let d = setup();
    let imgs = d.path().join("imgs");
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    let out = Command::new(BIN)
        .args(train_args(&imgs, &one, method, 2))
        .args(["--sync-bn"])
        .args(extra)
        .output()
        .unwrap();
    assert_ok(&out);
    let out = Command::new(BIN)
        .args(train_args(&imgs, &two, method, 2))
        .args(["--sync-bn", "--ranks", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1 of 2 (local): 8 images per rank"),
        "{err}"
    );
    // Only rank 0 reports.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("done:")
            .count(),
        1
    );
    // The run records its ranks, each with one thread.
    let record = std::fs::read_to_string(two.join("record.jsonl")).unwrap();
    assert!(record.contains("\"threads\":1,\"ranks\":2"), "{record}");
    assert_same_training(method, &one, &two, "2 thread ranks");
    if extra.contains(&"--bn-recalibrate") {
        for run in [&one, &two] {
            let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
            let last = m
                .lines()
                .rfind(|l| l.contains("\"kind\":\"epoch\""))
                .unwrap();
            assert!(
                last.contains("\"bn_recalibrate_s\":")
                    && !last.contains("\"bn_recalibrate_s\":null"),
                "{last}"
            );
        }
    }
}

#[test]
fn simclr_on_two_thread_ranks_equals_one_process() {
    two_thread_ranks_equal_one("simclr", &[]);
}

#[test]
fn vicreg_on_two_thread_ranks_equals_one_process() {
    // With the BatchNorm recalibration after the last epoch: each rank recalibrates on its
    // part of the same global batches, the statistics synchronised as in training.
    two_thread_ranks_equal_one("vicreg", &["--bn-recalibrate", "true"]);
}

#[test]
fn automatic_ranks_take_one_core_each() {
    let d = setup();
    let imgs = d.path().join("imgs");
    let run = d.path().join("run");
    let out = Command::new(BIN)
        .args(train_args(&imgs, &run, "simclr", 1))
        .args(["--sync-bn", "--ranks", "0"])
        .output()
        .unwrap();
    assert_ok(&out);
    // One rank per core (one thread each), the most up to the cores that divide the batch of 16.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = (1..=cores.min(16)).rev().find(|r| 16 % r == 0).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if want > 1 {
        let line = format!("rank 1 of {want} (local): {} images per rank", 16 / want);
        assert!(err.contains(&line), "{err}");
    }
    let record = std::fs::read_to_string(run.join("record.jsonl")).unwrap();
    assert!(
        record.contains(&format!("\"threads\":1,\"ranks\":{want}")),
        "{record}"
    );
    // The run folder keeps the automatic setting for a resume on another machine.
    let toml = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(toml.contains("ranks = 0"), "{toml}");
}

#[test]
fn resume_under_two_thread_ranks_is_bit_identical() {
    let d = setup();
    let imgs = d.path().join("imgs");
    let (straight, resumed) = (d.path().join("straight"), d.path().join("resumed"));
    let run = |dir: &std::path::Path, extra: &[&str]| {
        let out = Command::new(BIN)
            .args(train_args(&imgs, dir, "simclr", 2))
            .args(["--ranks", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&out);
        out
    };
    run(&straight, &[]);
    let out = run(&resumed, &["--stop-after", "1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 1 epochs"));
    run(&resumed, &["--resume"]);
    let (a, b) = (model(&straight), model(&resumed));
    for (name, t) in &a {
        let v = |t: &candle_core::Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert!(
            v(t) == v(&b[name]),
            "{name} differs after resuming under 2 thread ranks"
        );
    }
    assert_eq!(losses(&straight), losses(&resumed));
    // The weights load like any checkpoint's.
    assert!(candle_core::safetensors::load(
        straight.join("checkpoint/model.safetensors"),
        &Device::Cpu
    )
    .is_ok());
}

/// `selfsup train ... extra` exits with code 2 within a minute and says `want`.
fn refused(extra: &[&str], want: &str) {
    let d = setup();
    let imgs = d.path().join("imgs");
    let run = d.path().join("run");
    // `extra` may replace the one thread of `train_args`.
    let mut args = train_args(&imgs, &run, "simclr", 1);
    if let Some(i) = extra.iter().position(|a| *a == "--threads") {
        let t = args.iter().position(|a| a == "--threads").unwrap();
        args[t + 1] = extra[i + 1].to_string();
    }
    let extra: Vec<&str> = match extra.iter().position(|a| *a == "--threads") {
        Some(i) => [&extra[..i], &extra[i + 2..]].concat(),
        None => extra.to_vec(),
    };
    let mut child = Command::new(BIN)
        .args(args)
        .args(&extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("selfsup train {extra:?} still runs after a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
    assert!(err.contains(want), "{extra:?}: {err}");
}

#[test]
fn bad_rank_settings_are_refused() {
    refused(&["--ranks", "2000"], "ranks must be 1 to 1024");
    refused(&["--ranks", "0"], "needs sync_bn");
    refused(&["--ranks", "3"], "must be a multiple of the 3 ranks");
    refused(
        &["--ranks", "2", "--threads", "100000"],
        "more than this machine's",
    );
    refused(&["--ranks", "2", "--dist", "mpi"], "leave ranks at 1");
}

#[test]
fn a_failing_rank_ends_the_process() {
    // Both ranks find the finished run and stop before their first collective; the process
    // must end with the error, not wait for a rank that is gone.
    let d = setup();
    let imgs = d.path().join("imgs");
    let run = d.path().join("run");
    assert_ok(
        &Command::new(BIN)
            .args(train_args(&imgs, &run, "simclr", 1))
            .output()
            .unwrap(),
    );
    let out = Command::new(BIN)
        .args(train_args(&imgs, &run, "simclr", 1))
        .args(["--ranks", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("already holds a run"), "{err}");
    assert!(err.contains("of 2:"), "{err}");
}
