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

/// The encoder's tensors in a run folder's checkpoint/encoder.safetensors, as bit patterns.
fn encoder_bits(dir: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    common::file_bits(dir, "encoder.safetensors")
}

#[test]
fn bn_recalibration_sets_the_encoders_statistics_from_whole_training_images() {
    use candle_core::{DType, Device};
    use selfsup_data::{preset_views, Loader, LoaderConfig, Preset};

    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = cfg(a.path(), 2, 0.0);
    build_trainer(&plain, data()).unwrap().fit(None).unwrap();
    let recal = TrainConfig {
        bn_recalibrate: true,
        ..cfg(b.path(), 2, 0.0)
    };
    let s = build_trainer(&recal, data()).unwrap().fit(None).unwrap();
    assert_eq!(s.knn.len(), 1);
    // Only the encoder's BatchNorm buffers differ between the two checkpoints: every weight
    // and the projector's statistics are the same to the bit.
    let (wa, wb) = (weights(a.path()), weights(b.path()));
    let differ: Vec<&String> = wa
        .iter()
        .zip(&wb)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| &x.0)
        .collect();
    assert!(!differ.is_empty());
    assert!(
        differ
            .iter()
            .all(|n| n.contains("running") && !n.contains("proj")),
        "{differ:?}"
    );
    // They are what recalibrating the plain run's encoder gives, on the loader the run uses
    // (whole training images, shuffled with the run's seed, full batches of the run's size).
    let vm = candle_nn::VarMap::new();
    let enc = selfsup_models::build_encoder(
        &plain.encoder.parse().unwrap(),
        selfsup_models::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    selfsup_models::io::load_varmap(&vm, "", &a.path().join("checkpoint/encoder.safetensors"))
        .unwrap();
    let d = data();
    let loader = Loader::new(
        d.train.clone(),
        preset_views(Preset::None, plain.image_size, d.normalize.clone()),
        LoaderConfig {
            batch_size: plain.batch_size,
            shuffle: true,
            drop_last: true,
            seed: plain.seed,
            threads: 1,
            prefetch: 1,
            shard: (0, 1),
        },
    )
    .unwrap();
    let n =
        selfsup_eval::recalibrate_batch_norm(enc.as_ref(), &loader, &Device::Cpu, None).unwrap();
    assert_eq!(n, 64);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("checkpoint")).unwrap();
    selfsup_models::io::save_varmap(&vm, "", &dir.path().join("checkpoint/encoder.safetensors"))
        .unwrap();
    assert_eq!(encoder_bits(dir.path()), encoder_bits(b.path()));
    // The final epoch's metrics line says what it cost.
    let m = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        m.lines()
            .rfind(|l| l.contains("\"kind\":\"epoch\""))
            .unwrap(),
    )
    .unwrap();
    assert!(last["bn_recalibrate_s"].as_f64().unwrap() > 0.0, "{last}");
}

#[test]
fn a_budget_that_ends_the_run_at_its_first_epoch_still_recalibrates() {
    let d = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        bn_recalibrate: true,
        ..cfg(d.path(), 5, 1e-3)
    };
    let s = build_trainer(&c, data()).unwrap().fit(None).unwrap();
    assert_eq!(s.epochs, 1);
    let m = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let epoch: serde_json::Value = serde_json::from_str(
        m.lines()
            .find(|l| l.contains("\"kind\":\"epoch\""))
            .unwrap(),
    )
    .unwrap();
    assert!(epoch["bn_recalibrate_s"].as_f64().unwrap() > 0.0, "{epoch}");
    // Too few images for one batch: refused before any work.
    let mut tiny = data();
    tiny.train = std::sync::Arc::new(tiny.train.subset(&(0..10).collect::<Vec<_>>()));
    let c = TrainConfig {
        bn_recalibrate: true,
        knn_every: 0,
        ..cfg(d.path(), 1, 0.0)
    };
    let e = build_trainer(&c, tiny).err().map(|e| e.to_string());
    assert!(e.as_deref().is_some_and(|e| e.contains("batch")), "{e:?}");
}

#[test]
fn patch_whitening_starts_the_first_convolution_from_the_datas_whitening_filters() {
    use selfsup_models::whitening::{patch_second_moment, whitening_filters};
    let d = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        patch_whitening: true,
        ..cfg(d.path(), 1, 0.0)
    };
    let data = data();
    let t = build_trainer(&c, data.clone()).unwrap();
    let w: Vec<f32> = t.method().varmap().data().lock().unwrap()["encoder.conv1.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The training images (fewer than WHITENING_IMAGES here), normalised, by hand.
    let tr = &data.train;
    let (ch, h, wd) = (tr.channels, tr.height, tr.width);
    let px: Vec<f32> = tr
        .pixels
        .chunks_exact(h * wd)
        .enumerate()
        .flat_map(|(i, p)| {
            let c = i % ch;
            let (m, s) = (data.normalize.mean[c], data.normalize.std[c]);
            p.iter().map(move |&v| (v as f32 / 255.0 - m) / s)
        })
        .collect();
    let n = px.len() / (ch * h * wd);
    let moment = patch_second_moment(&px, (n, ch, h, wd), 3).unwrap();
    // small-cnn's conv1: 32 filters = 16 whitening directions and their negatives.
    let f = whitening_filters(&moment, 27, 16, selfsup_train::whiten::WHITENING_EPS).unwrap();
    assert_eq!(w.len(), f.len());
    assert_eq!(w, f);
    drop(t);
    // It trains, and learns otherwise than from random filters.
    assert_learns_differently(
        |c| c,
        |c| TrainConfig {
            patch_whitening: true,
            ..c
        },
    );
}
