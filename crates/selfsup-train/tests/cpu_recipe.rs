//! The options the one-hour CPU recipe is built from, through the trainer. A time-budgeted run
//! fits its length after the first epoch, writes it to config.toml, and is otherwise the run
//! with that many epochs; a resumed run keeps the fitted length. The global crop scale, the colour
//! jitter's scale and the global view size are settings that change what the run learns.

mod common;

use common::{checkpoint_bits as weights, stripes_data as data, vicreg_batch16};
use selfsup_train::setup::build_trainer;
use selfsup_train::TrainConfig;

fn cfg(out: &std::path::Path, epochs: usize, budget_s: f64) -> TrainConfig {
    let c = vicreg_batch16(out);
    TrainConfig {
        epochs,
        lr: 0.1,
        // The warmup covers the first epoch: its steps do not depend on the run's length.
        warmup_epochs: 1.0,
        proj_hidden: 64,
        proj_out: 64,
        knn_every: 2,
        knn_k: 10,
        seed: 5,
        threads: 2,
        log_every: 1,
        time_budget_s: budget_s,
        ..c
    }
}

fn saved_epochs(dir: &std::path::Path) -> usize {
    TrainConfig::from_toml(&std::fs::read_to_string(dir.join("config.toml")).unwrap())
        .unwrap()
        .epochs
}

fn budget_line(dir: &std::path::Path) -> serde_json::Value {
    let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let l = m
        .lines()
        .find(|l| l.contains("\"kind\":\"budget\""))
        .expect("a budget line");
    serde_json::from_str(l).unwrap()
}

#[test]
fn a_spent_budget_stops_after_the_first_epoch_as_a_one_epoch_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A millisecond: nothing fits after the calibration epoch.
    let s = build_trainer(&cfg(a.path(), 5, 1e-3), data())
        .unwrap()
        .fit(None)
        .unwrap();
    assert_eq!(s.epochs, 1);
    assert_eq!(saved_epochs(a.path()), 1);
    let line = budget_line(a.path());
    assert_eq!(line["epochs"], 1);
    assert_eq!(line["max_epochs"], 5);
    assert!(line["knn_s"].as_f64().unwrap() > 0.0, "{line}");
    assert!(line["epoch_s"].as_f64().unwrap() > 0.0, "{line}");
    build_trainer(&cfg(b.path(), 1, 0.0), data())
        .unwrap()
        .fit(None)
        .unwrap();
    assert_eq!(weights(a.path()), weights(b.path()));
}

#[test]
fn an_ample_budget_trains_every_epoch_as_the_run_without_one() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = build_trainer(&cfg(a.path(), 3, 1e6), data())
        .unwrap()
        .fit(None)
        .unwrap();
    assert_eq!(s.epochs, 3);
    assert_eq!(budget_line(a.path())["epochs"], 3);
    // The calibration's extra kNN evaluation after epoch 1 changes nothing in the weights.
    assert_eq!(s.knn.iter().map(|k| k.0).collect::<Vec<_>>(), [1, 2, 3]);
    build_trainer(&cfg(b.path(), 3, 0.0), data())
        .unwrap()
        .fit(None)
        .unwrap();
    assert_eq!(weights(a.path()), weights(b.path()));
}

#[test]
fn a_resumed_budgeted_run_keeps_its_fitted_length() {
    let d = tempfile::tempdir().unwrap();
    // Stopped after its calibration epoch, which fitted one epoch...
    let mut t = build_trainer(&cfg(d.path(), 4, 1e-3), data()).unwrap();
    t.fit(Some(1)).unwrap();
    drop(t);
    // ...resumed from the saved config: the run is complete, nothing is refitted.
    let saved =
        TrainConfig::from_toml(&std::fs::read_to_string(d.path().join("config.toml")).unwrap())
            .unwrap();
    assert_eq!(saved.epochs, 1);
    let mut t = build_trainer(&saved, data()).unwrap();
    assert!(t.resume().unwrap());
    let s = t.fit(None).unwrap();
    assert_eq!((s.epochs, s.steps), (1, 4));
    let m = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    assert_eq!(m.matches("\"kind\":\"budget\"").count(), 1);
}

#[test]
fn bad_budgets_and_crop_scales_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for b in [-1.0, f64::NAN, f64::INFINITY] {
        let e = build_trainer(&cfg(d.path(), 2, b), data())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("time_budget_s"), "{e}");
    }
    let c = TrainConfig {
        crop_min_scale: 0.0,
        ..cfg(d.path(), 2, 0.0)
    };
    let e = build_trainer(&c, data()).err().unwrap().to_string();
    assert!(e.contains("crop_min_scale"), "{e}");
    for j in [-0.1, 5.5, f64::NAN] {
        let c = TrainConfig {
            jitter_scale: j,
            ..cfg(d.path(), 2, 0.0)
        };
        let e = build_trainer(&c, data()).err().unwrap().to_string();
        assert!(e.contains("jitter_scale must be in 0..=5"), "{e}");
    }
}

/// Trains one epoch with each of two changes to the base config; their weights must differ.
fn assert_learns_differently(
    a: impl Fn(TrainConfig) -> TrainConfig,
    b: impl Fn(TrainConfig) -> TrainConfig,
) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build_trainer(&a(cfg(da.path(), 1, 0.0)), data())
        .unwrap()
        .fit(None)
        .unwrap();
    build_trainer(&b(cfg(db.path(), 1, 0.0)), data())
        .unwrap()
        .fit(None)
        .unwrap();
    assert_ne!(weights(da.path()), weights(db.path()));
}

#[test]
fn the_jitter_scale_changes_what_is_learned() {
    assert_learns_differently(
        |c| TrainConfig {
            jitter_scale: 1.0,
            ..c
        },
        |c| TrainConfig {
            jitter_scale: 0.5,
            ..c
        },
    );
}

#[test]
fn the_global_crop_scale_changes_what_is_learned() {
    assert_learns_differently(
        |c| TrainConfig {
            crop_min_scale: 0.08,
            ..c
        },
        |c| TrainConfig {
            crop_min_scale: 0.6,
            ..c
        },
    );
}

#[test]
fn smaller_global_views_train_and_the_monitor_sees_whole_images() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, size) in [(a.path(), 0), (b.path(), 16)] {
        let c = TrainConfig {
            crop_size: size,
            knn_every: 1,
            ..cfg(dir, 1, 0.0)
        };
        let s = build_trainer(&c, data()).unwrap().fit(None).unwrap();
        assert_eq!(s.knn.len(), 1);
    }
    assert_ne!(weights(a.path()), weights(b.path()));
    // A view too small for the encoder's three poolings is refused before any work.
    let c = TrainConfig {
        crop_size: 4,
        ..cfg(a.path(), 1, 0.0)
    };
    let e = build_trainer(&c, data()).err().unwrap().to_string();
    assert!(e.contains("crop_size 4 does not fit"), "{e}");
}
