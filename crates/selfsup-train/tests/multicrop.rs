//! Multi-crop through the trainer: local views train, resume exactly, and are refused where
//! they cannot work; the kNN monitor with flip test-time augmentation.

mod common;

use common::{checkpoint_bits as weights, stripes_data as data, vicreg_batch16};
use selfsup_train::setup::build_trainer;
use selfsup_train::TrainConfig;

fn cfg(out: &std::path::Path, local_crops: usize) -> TrainConfig {
    let c = vicreg_batch16(out);
    TrainConfig {
        epochs: 2,
        lr: 0.1,
        warmup_epochs: 0.0,
        proj_hidden: 64,
        proj_out: 64,
        local_crops,
        local_crop_size: 16,
        knn_every: 2,
        knn_flip: true,
        knn_k: 10,
        seed: 5,
        threads: 2,
        log_every: 1,
        ..c
    }
}

#[test]
fn local_views_train_and_resume_exactly() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut t = build_trainer(&cfg(a.path(), 2), data()).unwrap();
    t.fit(None).unwrap();
    drop(t);
    let metrics = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    let last = metrics
        .lines()
        .rfind(|l| l.contains("\"kind\":\"epoch\""))
        .unwrap();
    assert!(
        last.contains("\"knn_top1\":") && !last.contains("\"knn_top1\":null"),
        "the kNN monitor ran: {last}"
    );
    // Stopped after one epoch and resumed: the same weights, bit for bit (local views are
    // drawn from the seed like every view).
    let mut t = build_trainer(&cfg(b.path(), 2), data()).unwrap();
    t.fit(Some(1)).unwrap();
    drop(t);
    let mut t = build_trainer(&cfg(b.path(), 2), data()).unwrap();
    assert!(t.resume().unwrap());
    t.fit(None).unwrap();
    drop(t);
    assert_eq!(weights(a.path()), weights(b.path()));
    // The local views are used: without them the same seed trains other weights.
    let mut t = build_trainer(&cfg(c.path(), 0), data()).unwrap();
    t.fit(None).unwrap();
    drop(t);
    assert_ne!(weights(a.path()), weights(c.path()));
}

#[test]
fn local_views_are_refused_where_they_cannot_work() {
    let d = tempfile::tempdir().unwrap();
    let mut moco = cfg(d.path(), 2);
    moco.apply_method_defaults("moco");
    moco.local_crops = 2;
    let e = build_trainer(&moco, data()).err().unwrap().to_string();
    assert!(
        e.contains("takes exactly two views") && e.contains("simclr, barlow, vicreg"),
        "{e}"
    );
    let tiny = TrainConfig {
        local_crop_size: 1,
        ..cfg(d.path(), 2)
    };
    let e = build_trainer(&tiny, data()).err().unwrap().to_string();
    assert!(e.contains("local_crop_size 1 does not fit"), "{e}");
    let bad = TrainConfig {
        local_crop_min_scale: 0.0,
        ..cfg(d.path(), 2)
    };
    let e = build_trainer(&bad, data()).err().unwrap().to_string();
    assert!(e.contains("local crop scale"), "{e}");
}
