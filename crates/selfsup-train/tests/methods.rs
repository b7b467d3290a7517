//! Every method trains through the same trainer: on small synthetic data its loss goes down,
//! the metrics carry the collapse signal, and the checkpoint holds what resuming needs.

use std::sync::Arc;

use selfsup_data::{synthetic, Normalize};
use selfsup_train::optim::OptimizerKind;
use selfsup_train::setup::{build_trainer, RunData};
use selfsup_train::TrainConfig;

fn data() -> RunData {
    RunData {
        train: Arc::new(synthetic::stripes(192, 16, 4, 1)),
        test: Some(Arc::new(synthetic::stripes(64, 16, 4, 2))),
        normalize: Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    }
}

fn cfg(method: &str, out: &std::path::Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.apply_method_defaults(method);
    // Small heads and a short, quick run.
    c.proj_hidden = c.proj_hidden.min(128);
    c.proj_out = c.proj_out.min(64);
    c.pred_hidden = c.pred_hidden.min(64);
    c.queue_size = 128;
    c.epochs = 4;
    c.batch_size = 32;
    c.image_size = 16;
    c.optimizer = OptimizerKind::Adamw;
    c.lr = 2e-3;
    c.weight_decay = 1e-4;
    c.warmup_epochs = 0.0;
    c.knn_every = 0;
    c.seed = 7;
    c.threads = 2;
    c.log_every = 1;
    c.out = out.to_str().unwrap().to_string();
    c
}

fn loss_goes_down(method: &str) {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(method, dir.path());
    let mut t = build_trainer(&c, data()).unwrap();
    assert_eq!(t.method().name(), method);
    let s = t.fit(None).unwrap();
    let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
    eprintln!("{method}: loss {first:.4} -> {last:.4}");
    assert!(
        last < first - 0.02 * first.abs().max(0.1),
        "{method}: loss did not go down: {first} -> {last}"
    );
    let m = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let std: Vec<f64> = m
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["embed_std"].as_f64())
        .collect();
    assert!(!std.is_empty() && std.iter().all(|s| s.is_finite()));
    assert!(dir.path().join("checkpoint/model.safetensors").is_file());
}

#[test]
fn simclr_loss_goes_down() {
    loss_goes_down("simclr");
}

// MoCo's loss on these 4 look-alike classes rises towards log(K + 1): every queued key of the
// anchor's class is a false negative that the augmentations make indistinguishable. Its loss
// is shown going down on distinct images in selfsup-methods/tests/methods.rs; here it trains
// and resumes exactly (below).

#[test]
fn byol_loss_goes_down() {
    loss_goes_down("byol");
}

#[test]
fn simsiam_loss_goes_down() {
    loss_goes_down("simsiam");
}

#[test]
fn barlow_loss_goes_down() {
    loss_goes_down("barlow");
}

#[test]
fn vicreg_loss_goes_down() {
    loss_goes_down("vicreg");
}

#[test]
fn supcon_loss_goes_down() {
    loss_goes_down("supcon");
}

#[test]
fn pairs_loss_goes_down() {
    loss_goes_down("pairs");
}

#[test]
fn rotation_loss_goes_down() {
    loss_goes_down("rotation");
}

#[test]
fn colorization_loss_goes_down() {
    loss_goes_down("colorization");
}

#[test]
fn hybrid_loss_goes_down() {
    loss_goes_down("simclr+rotation");
}

#[test]
fn triplet_and_regression_colour_variants_train() {
    for (method, f) in [
        (
            "pairs",
            &(|c: &mut TrainConfig| c.pair_loss = "triplet".into()) as &dyn Fn(&mut TrainConfig),
        ),
        ("pairs", &|c: &mut TrainConfig| c.pair_labels = true),
        ("colorization", &|c: &mut TrainConfig| {
            c.color_target = "regression".into()
        }),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(method, dir.path());
        c.epochs = 2;
        f(&mut c);
        let s = build_trainer(&c, data()).unwrap().fit(None).unwrap();
        let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
        eprintln!("{method} variant: loss {first:.4} -> {last:.4}");
        assert!(last.is_finite() && last < first, "{first} -> {last}");
    }
}

#[test]
fn moco_resume_is_bit_identical_queue_included() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut ca = cfg("moco", a.path());
    ca.epochs = 2;
    let mut cb = cfg("moco", b.path());
    cb.epochs = 2;
    build_trainer(&ca, data()).unwrap().fit(None).unwrap();
    build_trainer(&cb, data()).unwrap().fit(Some(1)).unwrap();
    let mut t = build_trainer(&cb, data()).unwrap();
    assert!(t.resume().unwrap());
    t.fit(None).unwrap();
    let read = |d: &std::path::Path| {
        selfsup_train::checkpoint::read_tensors(&d.join("checkpoint/model.safetensors")).unwrap()
    };
    let (wa, wb) = (read(a.path()), read(b.path()));
    assert!(wa.contains_key("state.queue") && wa.contains_key("target_encoder.conv1.weight"));
    for (k, x) in &wa {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = wb[k].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{k} differs after resume"
        );
    }
}

#[test]
fn labelled_methods_refuse_unlabelled_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = data();
    let mut train = (*d.train).clone();
    train.labels = None;
    d.train = Arc::new(train);
    let e = build_trainer(&cfg("supcon", dir.path()), d)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("uses labels"), "{e}");
}

#[test]
fn barlow_and_vicreg_default_to_lars_others_keep_the_optimiser() {
    for (method, wd) in [("barlow", 1.5e-6), ("vicreg", 1e-6)] {
        let mut c = TrainConfig {
            batch_size: 512,
            ..TrainConfig::default()
        };
        c.apply_method_defaults(method);
        assert_eq!(c.optimizer, OptimizerKind::Lars, "{method}");
        assert!((c.lr - 0.4).abs() < 1e-12, "{method}: lr {}", c.lr);
        assert_eq!(c.weight_decay, wd, "{method}");
        assert_eq!((c.proj_hidden, c.proj_out), (2048, 2048));
    }
    let mut c = TrainConfig::default();
    let (opt, lr, wd) = (c.optimizer, c.lr, c.weight_decay);
    c.apply_method_defaults("simclr");
    assert_eq!((c.optimizer, c.lr, c.weight_decay), (opt, lr, wd));
}

/// Colorization trains its encoder on grey images only: the method's encoder (what the kNN
/// monitor uses) and `inference_encoder` (what `selfsup eval` / `embed` / `neighbors` use)
/// both feed it `grey_input` of the images, bit for bit; other methods feed images as they are.
#[test]
fn a_colorization_encoder_is_fed_grey_images_at_inference() {
    use candle_core::{DType, Device, Tensor};
    use selfsup_methods::{grey_input, ENCODER_PREFIX};
    use selfsup_models::{build_encoder, seeded_var_builder};
    use selfsup_train::setup::inference_encoder;

    let norm = data().normalize;
    let x = Tensor::randn(0f32, 1f32, (6, 3, 16, 16), &Device::Cpu).unwrap();
    let vals = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for method in ["colorization", "rotation", "simclr+colorization"] {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(method, dir.path());
        let t = build_trainer(&c, data()).unwrap();
        // The same weights as a bare encoder (the builder reuses the method's variables).
        let vb = seeded_var_builder(t.method().varmap(), 0, DType::F32, &Device::Cpu);
        let bare = build_encoder(
            &c.encoder.parse().unwrap(),
            vb.pp(ENCODER_PREFIX.trim_end_matches('.')),
        )
        .unwrap();
        let grey = grey_input(&x, &norm.mean, &norm.std).unwrap();
        let on_colour = vals(bare.features(&x).unwrap());
        let on_grey = vals(bare.features(&grey).unwrap());
        assert_ne!(on_colour, on_grey);
        let want = if method == "colorization" {
            &on_grey
        } else {
            &on_colour
        };
        assert_eq!(
            &vals(t.method().encoder().features(&x).unwrap()),
            want,
            "{method}"
        );
        let outside = inference_encoder(&c, bare, &norm);
        assert_eq!(&vals(outside.features(&x).unwrap()), want, "{method}");
        assert_eq!(
            &vals(outside.forward_t(&x, false).unwrap().detach()),
            want,
            "{method}"
        );
    }
    // The grey input carries no colour: two images with the same lightness give it equally.
    let g = grey_input(&x, &norm.mean, &norm.std).unwrap();
    let c0 = g.narrow(1, 0, 1).unwrap();
    for ch in 1..3 {
        let d = ((&c0 * norm.std[0] as f64).unwrap() + norm.mean[0] as f64).unwrap();
        let e = ((g.narrow(1, ch, 1).unwrap() * norm.std[ch] as f64).unwrap()
            + norm.mean[ch] as f64)
            .unwrap();
        let diff = (d - e).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
    assert!(grey_input(&x.narrow(1, 0, 2).unwrap(), &norm.mean, &norm.std).is_err());
}
