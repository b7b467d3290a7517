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

/// The kNN results of a run's epoch lines: (epoch, top-1, top-5, flip-averaged, augmentation).
fn knn_lines(dir: &std::path::Path) -> Vec<(u64, f64, f64, bool, String)> {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch" && !v["knn_top1"].is_null())
        .map(|v| {
            (
                v["epoch"].as_u64().unwrap(),
                v["knn_top1"].as_f64().unwrap(),
                v["knn_top5"].as_f64().unwrap(),
                v["knn_flip"].as_bool().unwrap(),
                v["knn_tta"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn final_flip_averages_only_the_last_evaluation() {
    // Eight stripe orientations: a mirror image turns class c into class 8 - c, so
    // flip-averaged features vote differently from plain ones.
    let eight = || selfsup_train::setup::RunData {
        train: std::sync::Arc::new(selfsup_data::synthetic::stripes(64, 32, 8, 1)),
        test: Some(std::sync::Arc::new(selfsup_data::synthetic::stripes(
            64, 32, 8, 2,
        ))),
        ..data()
    };
    let run = |flip: bool, final_tta: &str| {
        let d = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            knn_every: 1,
            knn_flip: flip,
            knn_final_tta: final_tta.into(),
            threads: 1,
            ..cfg(d.path(), 0)
        };
        let mut t = build_trainer(&c, eight()).unwrap();
        t.fit(None).unwrap();
        drop(t);
        (knn_lines(d.path()), weights(d.path()))
    };
    let (final_only, wa) = run(false, "flip");
    let (always, wb) = run(true, "none");
    let (never, wc) = run(false, "none");
    let (shifted, wd) = run(false, "flip-shift");
    let (always_shifted, we) = run(true, "flip-shift");
    // The evaluations do not touch training.
    assert_eq!(wa, wb);
    assert_eq!(wa, wc);
    assert_eq!(wa, wd);
    assert_eq!(wa, we);
    // Six views at the end only, the periodic evaluation as the monitor's setting says.
    assert_eq!(shifted[0], never[0]);
    assert_eq!(always_shifted[0], always[0]);
    assert_eq!(shifted[1].4, "flip-shift");
    assert_eq!(shifted[1], always_shifted[1]);
    assert_eq!(never[1].4, "none");
    assert_eq!(always[1].4, "flip");
    assert_ne!(
        (shifted[1].1, shifted[1].2),
        (final_only[1].1, final_only[1].2),
        "the shifted views changed nothing here, so this test cannot tell"
    );
    assert_eq!(final_only.len(), 2, "{final_only:?}");
    // Epoch 1 is a periodic evaluation: plain features, as without final_flip.
    assert_eq!(final_only[0], never[0]);
    assert!(!final_only[0].3);
    // Epoch 2 is the last: flip-averaged, as with knn_flip, and not what plain features give.
    assert_eq!(final_only[1], always[1]);
    assert!(final_only[1].3 && !never[1].3);
    assert_ne!(
        (final_only[1].1, final_only[1].2),
        (never[1].1, never[1].2),
        "flip averaging changed nothing here, so this test cannot tell"
    );
}
