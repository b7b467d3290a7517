//! kNN, linear probe, balanced subsets, and feature extraction keeping no graph.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use selfsup_data::{preset_views, synthetic, Loader, LoaderConfig, Normalize, Preset};
use selfsup_eval::*;
use selfsup_models::{build_encoder, seeded_var_builder, EncoderKind};

#[test]
fn knn_and_probe_on_separable_features() {
    // Four classes in 8-D: class c is a Gaussian blob (std 0.5) around 5 * e_c, so the nearest
    // other center is 7.1 away. Seeded, so the data (and the result) is the same on every run.
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let noise = rand_distr::Normal::new(0f32, 0.5).unwrap();
    let mut make = |n: usize| {
        let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
        let x: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..8).map(move |d| if d == l { 5f32 } else { 0. }))
            .map(|v| v + noise.sample(&mut rng))
            .collect();
        (Tensor::from_vec(x, (n, 8), &dev).unwrap(), labels)
    };
    let (tr, trl) = make(200);
    let (te, tel) = make(100);
    let (t1, t5) = knn(
        &tr,
        &trl,
        &te,
        &tel,
        4,
        KnnConfig {
            k: 20,
            temperature: 0.1,
        },
    )
    .unwrap();
    // Top-5 of 4 classes is always 1, so only top-1 is asserted here; tests/reference.rs checks
    // both against lightly.
    assert!(t1 > 0.95, "{t1} {t5}");
    let r = linear_probe(
        &tr,
        &trl,
        &te,
        &tel,
        4,
        // 200 samples are one mini-batch, so an epoch is one AdamW step: 100 steps at lr 0.05
        // separate the blobs (30 steps at the default 1e-3 do not).
        &LinearProbeConfig {
            epochs: 100,
            lr: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.top1 > 0.95, "{r:?}");
    // Permuted training labels: kNN then predicts the wrong class every time.
    let shuffled: Vec<usize> = trl.iter().map(|&l| (l * 7 + 3) % 4).collect();
    let (s1, _) = knn(&tr, &shuffled, &te, &tel, 4, KnnConfig::default()).unwrap();
    assert!(s1 < 0.1, "{s1}");
    assert!(knn(&tr, &trl[..10], &te, &tel, 4, KnnConfig::default()).is_err());
}

#[test]
fn balanced_subsets_are_balanced_and_seeded() {
    let labels: Vec<usize> = (0..1000).map(|i| i % 10).collect();
    let a = balanced_subset(&labels, 0.01, 3);
    assert_eq!(a.len(), 10);
    let mut per = [0; 10];
    for &i in &a {
        per[labels[i]] += 1;
    }
    assert_eq!(per, [1; 10]);
    assert_eq!(a, balanced_subset(&labels, 0.01, 3));
    assert_ne!(
        balanced_subset(&labels, 0.1, 3),
        balanced_subset(&labels, 0.1, 4)
    );
    assert_eq!(balanced_subset(&labels, 0.1, 3).len(), 100);
}

/// A small-cnn drawn from `seed` (with its `VarMap`) and an evaluation loader over `n` 16 px
/// stripe images of 2 classes.
fn small_cnn_and_stripes(
    n: usize,
    seed: u64,
    batch_size: usize,
    shuffle: bool,
) -> (candle_nn::VarMap, Box<dyn selfsup_models::Encoder>, Loader) {
    let ds = Arc::new(synthetic::stripes(n, 16, 2, seed));
    let vm = candle_nn::VarMap::new();
    let enc = build_encoder(
        &EncoderKind::SmallCnn,
        seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let l = Loader::new(
        ds,
        preset_views(Preset::None, 16, Normalize::cifar10()),
        LoaderConfig {
            batch_size,
            shuffle,
            drop_last: false,
            ..Default::default()
        },
    )
    .unwrap();
    (vm, enc, l)
}

#[test]
fn features_keep_no_graph() {
    let (_vm, enc, l) = small_cnn_and_stripes(20, 0, 8, true);
    let f = extract_features(enc.as_ref(), &l, &Device::Cpu).unwrap();
    assert_eq!(f.x.dims(), &[20, 256]);
    // Outputs of a model with variables carry its graph unless detached (a 24 GiB leak once).
    assert!(!f.x.track_op());
    // Rows are back in dataset order although the loader shuffled.
    let labels = f.labels.unwrap();
    assert_eq!(labels, (0..20).map(|i| i % 2).collect::<Vec<_>>());
}

#[test]
fn knn_refuses_non_finite_features() {
    let dev = candle_core::Device::Cpu;
    let bank = candle_core::Tensor::new(&[[1f32, 0.], [0., 1.], [f32::NAN, 0.]], &dev).unwrap();
    let q = candle_core::Tensor::new(&[[1f32, 0.1]], &dev).unwrap();
    let cfg = selfsup_eval::KnnConfig {
        k: 2,
        temperature: 0.1,
    };
    let e = selfsup_eval::knn(&bank, &[0, 1, 1], &q, &[0], 2, cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN or infinite"), "{e}");
    let inf = candle_core::Tensor::new(&[[f32::INFINITY, 0.1]], &dev).unwrap();
    let bank = candle_core::Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
    assert!(selfsup_eval::knn(&bank, &[0, 1], &inf, &[0], 2, cfg).is_err());
}

#[test]
fn the_linear_probe_refuses_non_finite_features() {
    let dev = candle_core::Device::Cpu;
    let ok = candle_core::Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
    let bad = candle_core::Tensor::new(&[[1f32, f32::NAN], [0., 1.]], &dev).unwrap();
    let cfg = selfsup_eval::LinearProbeConfig::default();
    for (train, test) in [(&bad, &ok), (&ok, &bad)] {
        let e = selfsup_eval::linear_probe(train, &[0, 1], test, &[0, 1], 2, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NaN or infinite"), "{e}");
    }
}

#[test]
fn flip_tta_averages_each_image_with_its_mirror() {
    let (_vm, enc, l) = small_cnn_and_stripes(12, 5, 5, false);
    let plain = extract_features(enc.as_ref(), &l, &Device::Cpu).unwrap();
    let tta = extract_features_tta(enc.as_ref(), &l, &Device::Cpu, Tta::Flip).unwrap();
    // By hand: the mirrored images through the encoder, averaged with the plain features.
    let x = Tensor::cat(
        &l.epoch(0)
            .map(|b| b.unwrap().views[0].clone())
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let mirrored = flip_horizontal(&x).unwrap();
    // Row 3 of the first channel of the first image, before and after the mirror.
    let row3 = |t: &Tensor| -> Vec<f32> {
        t.get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (row, mrow) = (row3(&x), row3(&mirrored));
    assert_eq!(row.iter().rev().copied().collect::<Vec<_>>(), mrow);
    let want = ((&plain.x + enc.features(&mirrored).unwrap()).unwrap() * 0.5).unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (
        tta.x.flatten_all().unwrap().to_vec1().unwrap(),
        want.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-5));
    // The mirror changes the features of these asymmetric images, so the average is not the
    // plain features.
    let p: Vec<f32> = plain.x.flatten_all().unwrap().to_vec1().unwrap();
    assert!(a.iter().zip(&p).any(|(x, y)| (x - y).abs() > 1e-4));
    assert_eq!(tta.labels, plain.labels);
    assert_eq!("flip".parse::<Tta>().unwrap(), Tta::Flip);
    assert!("mirror"
        .parse::<Tta>()
        .unwrap_err()
        .to_string()
        .contains("known: none, flip"));
}

#[test]
fn shift_replicate_moves_the_image_and_repeats_its_edge() {
    // One 3x4 channel: value 10 r + c.
    let v: Vec<f32> = (0..3)
        .flat_map(|r| (0..4).map(move |c| (10 * r + c) as f32))
        .collect();
    let x = Tensor::from_vec(v, (1, 1, 3, 4), &Device::Cpu).unwrap();
    let rows =
        |t: &Tensor| -> Vec<Vec<f32>> { t.get(0).unwrap().get(0).unwrap().to_vec2().unwrap() };
    let down_right = shift_replicate(&x, 1, 1).unwrap();
    assert_eq!(
        rows(&down_right),
        vec![
            vec![0., 0., 1., 2.],
            vec![0., 0., 1., 2.],
            vec![10., 10., 11., 12.]
        ]
    );
    let up_left = shift_replicate(&x, -1, -1).unwrap();
    assert_eq!(
        rows(&up_left),
        vec![
            vec![11., 12., 13., 13.],
            vec![21., 22., 23., 23.],
            vec![21., 22., 23., 23.]
        ]
    );
    assert_eq!(rows(&shift_replicate(&x, 0, 0).unwrap()), rows(&x));
    let e = shift_replicate(&x, 3, 0).unwrap_err().to_string();
    assert!(e.contains("a shift of 3 pixels in an image of 3"), "{e}");
}

#[test]
fn flip_shift_tta_averages_six_views() {
    let (_vm, enc, l) = small_cnn_and_stripes(12, 5, 5, false);
    let tta = extract_features_tta(enc.as_ref(), &l, &Device::Cpu, Tta::FlipShift).unwrap();
    let flip = extract_features_tta(enc.as_ref(), &l, &Device::Cpu, Tta::Flip).unwrap();
    let x = Tensor::cat(
        &l.epoch(0)
            .map(|b| b.unwrap().views[0].clone())
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    // By hand: the image, shifted down-right and up-left, each with its mirror image.
    let mut sum = (&flip.x * 2.0).unwrap();
    for d in [1, -1] {
        let s = shift_replicate(&x, d, d).unwrap();
        sum = (sum + enc.features(&s).unwrap()).unwrap();
        sum = (sum + enc.features(&flip_horizontal(&s).unwrap()).unwrap()).unwrap();
    }
    let want = (sum / 6.0).unwrap();
    let (a, b, f): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        tta.x.flatten_all().unwrap().to_vec1().unwrap(),
        want.flatten_all().unwrap().to_vec1().unwrap(),
        flip.x.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-5));
    assert!(a.iter().zip(&f).any(|(p, q)| (p - q).abs() > 1e-4));
    assert_eq!(tta.labels, flip.labels);
    assert_eq!("flip-shift".parse::<Tta>().unwrap(), Tta::FlipShift);
    assert_eq!(Tta::FlipShift.to_string(), "flip-shift");
    assert_eq!(
        [Tta::None, Tta::Flip, Tta::FlipShift].map(Tta::views),
        [1, 2, 6]
    );
}
