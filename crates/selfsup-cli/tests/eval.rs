//! `selfsup eval knn | linear | low-label` on a trained checkpoint: the printed numbers are
//! those of the library calls on the same weights and data, each invocation leaves a run
//! record, and bad settings are refused before any work.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_ok, selfsup, write_small_cifar};
use selfsup_data::{cifar, Loader, Normalize};
use selfsup_eval::{extract_features, knn, linear_probe, Features, KnnConfig, LinearProbeConfig};
use selfsup_methods::{Method, Placement, Supervised, CLASSIFIER_PREFIX};
use selfsup_models::{build_encoder, io, seeded_var_builder, Encoder, EncoderKind};

/// The percentages a line prints after each of `keys` (`"top-1 "` -> `12.34`).
fn numbers(line: &str, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            let at = line
                .find(k)
                .unwrap_or_else(|| panic!("{k:?} not in {line:?}"))
                + k.len();
            line[at..].split('%').next().unwrap().to_string()
        })
        .collect()
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

fn features(enc: &dyn Encoder, data: &Path) -> (Features, Features) {
    let load = |split| {
        let ds = std::sync::Arc::new(cifar::load(data, split).unwrap());
        let l = Loader::for_eval(ds, 32, Normalize::cifar10(), 1).unwrap();
        extract_features(enc, &l, &Device::Cpu).unwrap()
    };
    (load(cifar::Split::Train), load(cifar::Split::Test))
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_prints_what_the_library_computes_and_records_it() {
    let d = tempfile::tempdir().unwrap();
    write_small_cifar(d.path());
    let data = d.path().to_str().unwrap();
    let run = d.path().join("run");
    let out = selfsup()
        .args([
            "train",
            "--data-dir",
            data,
            "--epochs",
            "1",
            "--batch-size",
            "20",
        ])
        .args([
            "--knn-every",
            "0",
            "--threads",
            "1",
            "--out",
            run.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let ck = run.to_str().unwrap();
    let eval = |args: &[&str]| {
        let out = selfsup()
            .args(["eval"])
            .args(args)
            .args(["--checkpoint", ck, "--data-dir", data, "--threads", "1"])
            .output()
            .unwrap();
        assert_ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };

    // The library on the same weights.
    let checkpoint_encoder = || {
        let vm = candle_nn::VarMap::new();
        let enc = build_encoder(
            &EncoderKind::SmallCnn,
            seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
        )
        .unwrap();
        io::load_varmap(&vm, "", &run.join("checkpoint/encoder.safetensors")).unwrap();
        enc
    };
    let enc = checkpoint_encoder();
    let (tr, te) = features(enc.as_ref(), d.path());
    let (trl, tel) = (tr.labels.clone().unwrap(), te.labels.clone().unwrap());

    let stdout = eval(&["knn", "--k", "7", "--temperature", "0.2"]);
    let cfg = KnnConfig {
        k: 7,
        temperature: 0.2,
    };
    let (t1, t5) = knn(&tr.x, &trl, &te.x, &tel, 10, cfg).unwrap();
    assert_eq!(
        numbers(&stdout, &["top-1 ", "top-5 "]),
        [pct(t1), pct(t5)],
        "{stdout}"
    );

    // With the BatchNorm statistics recalibrated first: the library's recalibration (whole
    // training images, shuffled with seed 0, one batch of at most 512) on the same weights.
    let stdout = eval(&["knn", "--recalibrate-bn"]);
    {
        let enc = checkpoint_encoder();
        let train = std::sync::Arc::new(cifar::load(d.path(), cifar::Split::Train).unwrap());
        let n = selfsup_data::Dataset::len(train.as_ref());
        let loader = Loader::new(
            train,
            selfsup_data::preset_views(selfsup_data::Preset::None, 32, Normalize::cifar10()),
            selfsup_data::LoaderConfig {
                batch_size: n.min(512),
                shuffle: true,
                drop_last: true,
                seed: 0,
                threads: 1,
                prefetch: 1,
                shard: (0, 1),
            },
        )
        .unwrap();
        selfsup_eval::recalibrate_batch_norm(enc.as_ref(), &loader, &Device::Cpu, None).unwrap();
        let (rtr, rte) = features(enc.as_ref(), d.path());
        let (r1, r5) = knn(&rtr.x, &trl, &rte.x, &tel, 10, KnnConfig::default()).unwrap();
        assert_eq!(
            numbers(&stdout, &["top-1 ", "top-5 "]),
            [pct(r1), pct(r5)],
            "{stdout}"
        );
        // The features did change, and the checkpoint did not.
        assert_ne!(
            rtr.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tr.x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    let stdout = eval(&["linear", "--epochs", "5", "--lr", "0.01", "--knn"]);
    let probe = LinearProbeConfig {
        epochs: 5,
        lr: 0.01,
        ..Default::default()
    };
    let r = linear_probe(&tr.x, &trl, &te.x, &tel, 10, &probe).unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("linear probe"))
        .unwrap();
    assert_eq!(
        numbers(line, &["top-1 ", "top-5 ", "train top-1 "]),
        [pct(r.top1), pct(r.top5), pct(r.train_top1)],
        "{stdout}"
    );
    let (k1, _) = knn(&tr.x, &trl, &te.x, &tel, 10, KnnConfig::default()).unwrap();
    assert_eq!(numbers(&stdout, &["top-1 "]), [pct(k1)], "{stdout}");

    // Low-label: the probe on the subset's features, and the fine-tuned and scratch models the
    // run folders keep, scored on the test split.
    let ll = d.path().join("ll");
    let stdout = eval(&[
        "low-label",
        "--fractions",
        "0.5",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--out",
        ll.to_str().unwrap(),
    ]);
    let row = stdout.lines().find(|l| l.starts_with("| 50%")).unwrap();
    let cells: Vec<String> = row
        .split('|')
        .map(|c| c.trim().trim_end_matches('%').to_string())
        .filter(|c| !c.is_empty())
        .collect();
    let idx = selfsup_eval::balanced_subset(&trl, 0.5, 0);
    let ids = Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        idx.len(),
        &Device::Cpu,
    )
    .unwrap();
    let sub_labels: Vec<usize> = idx.iter().map(|&i| trl[i]).collect();
    let p = linear_probe(
        &tr.x.index_select(&ids, 0).unwrap(),
        &sub_labels,
        &te.x,
        &tel,
        10,
        &LinearProbeConfig::default(),
    )
    .unwrap();
    let supervised_top1 = |tag: &str| {
        let m = Supervised::new(
            &EncoderKind::SmallCnn,
            10,
            0,
            &Placement::new(Device::Cpu, DType::F32),
        )
        .unwrap();
        io::load_varmap(
            m.varmap(),
            "",
            &ll.join(tag).join("checkpoint/model.safetensors"),
        )
        .unwrap();
        let (_, te) = features(m.encoder(), d.path());
        let data = m.varmap().data().lock().unwrap();
        let w = data[&format!("{CLASSIFIER_PREFIX}layers.0.weight")].as_tensor();
        let b = data[&format!("{CLASSIFIER_PREFIX}layers.0.bias")].as_tensor();
        let logits: Vec<Vec<f32>> =
            te.x.matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(b)
                .unwrap()
                .to_vec2()
                .unwrap();
        selfsup_eval::topk_accuracy(&logits, &tel).0
    };
    assert_eq!(
        cells[1..],
        [
            pct(p.top1),
            pct(supervised_top1("finetune-50pct")),
            pct(supervised_top1("scratch-50pct"))
        ],
        "{stdout}"
    );

    // The run folder's record: the run (started, done) and each evaluation, with what produced it.
    let recs = records(&run.join("record.jsonl"));
    let kinds: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("train", "running"),
            ("train", "done"),
            ("eval knn", "done"),
            ("eval knn", "done"),
            ("eval linear", "done"),
            ("eval low-label", "done")
        ]
    );
    assert_eq!(recs[0]["id"], recs[1]["id"]);
    let commit = recs[0]["build"]["commit"].as_str().unwrap();
    assert!(commit == "unknown" || commit.len() == 40, "{commit}");
    for r in &recs {
        assert!(r["dataset"]
            .as_str()
            .unwrap()
            .starts_with("cifar10:sha256:"));
        assert!(!r["machine"]["cpu"].as_str().unwrap().is_empty());
        assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
        assert!(r["command"].as_array().unwrap().len() > 2);
    }
    assert_eq!(recs[1]["config"]["epochs"], 1);
    assert!(recs[1]["wall_s"].as_f64().unwrap() > 0.0);
    assert_eq!(recs[2]["results"]["top1"].as_f64().unwrap(), t1);
    assert_eq!(recs[2]["config"]["settings"]["k"], 7);
    assert_eq!(
        recs[2]["config"]["weights_sha256"].as_str().unwrap(),
        selfsup_data::fingerprint::file_sha256(&run.join("checkpoint/encoder.safetensors"))
            .unwrap()
    );
    assert_eq!(recs[2]["config"]["recalibrate_bn"], false);
    assert_eq!(recs[3]["config"]["recalibrate_bn"], true);
    assert_eq!(
        recs[4]["results"]["linear"]["top1"].as_f64().unwrap(),
        r.top1
    );
    assert_eq!(
        recs[5]["results"][0]["probe_top1"].as_f64().unwrap(),
        p.top1
    );
    // The low-label folder keeps its own copy.
    assert_eq!(records(&ll.join("record.jsonl")).len(), 1);
}

#[test]
fn bad_evaluation_settings_are_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    // No data at all: a refusal that came after loading would say so instead.
    let data = d.path().join("nothing-here");
    let data = data.to_str().unwrap();
    let refused = |args: &[&str], says: &str| {
        let out = selfsup()
            .args(args)
            .args(["--data-dir", data])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    let base = ["--baseline", "pixels"];
    refused(&[&["eval", "knn", "--k", "0"][..], &base].concat(), "k > 0");
    refused(
        &[&["eval", "knn", "--temperature=-1"][..], &base].concat(),
        "temperature > 0",
    );
    refused(
        &[&["eval", "linear", "--epochs", "0"][..], &base].concat(),
        "epochs > 0",
    );
    refused(
        &[&["eval", "linear", "--lr", "NaN"][..], &base].concat(),
        "lr > 0",
    );
    refused(
        &[
            "eval",
            "low-label",
            "--baseline",
            "random",
            "--fractions",
            "1.5",
        ],
        "not in (0, 1]",
    );
    refused(
        &[
            "eval",
            "low-label",
            "--baseline",
            "random",
            "--batch-size",
            "1",
        ],
        "--batch-size >= 2",
    );
    // Recalibration is an evaluation's step: embed would silently export other features.
    refused(
        &[
            &[
                "embed",
                "--recalibrate-bn",
                "--data",
                "cifar10-test",
                "--out",
                "e.npy",
            ][..],
            &base,
        ]
        .concat(),
        "--recalibrate-bn applies to `selfsup eval`",
    );
    // Training: the kNN monitor's settings and an image size the encoder cannot take fail
    // before the first step, not at the end of the first epoch.
    let cfg = d.path().join("c.toml");
    for (toml, says) in [
        ("knn_k = 0\n", "kNN needs k > 0"),
        (
            "knn_temperature = 0.0\n",
            "kNN needs k > 0 and a temperature > 0",
        ),
        (
            "image_size = 4\n",
            "image_size 4 does not fit encoder small-cnn",
        ),
    ] {
        std::fs::write(&cfg, toml).unwrap();
        let folder = d.path().join("imgs");
        common::write_folder(&folder);
        let run = d.path().join("r");
        let dataset = if toml.starts_with("image") {
            format!("folder:{}", folder.display())
        } else {
            "cifar10".to_string()
        };
        let out = selfsup()
            .args([
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--dataset",
                &dataset,
            ])
            .args([
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--out",
                run.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {stderr}");
        assert!(stderr.contains(says), "{toml}: {stderr}");
        assert!(!run.join("checkpoint").exists());
    }
}
