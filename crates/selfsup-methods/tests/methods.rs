//! Method mechanics: EMA targets follow the formula exactly, MoCo's queue is a FIFO of earlier
//! keys, stop-gradients stop gradients, rotation labels match the rotations applied, Lab
//! conversion, pair sampling, hybrids.

use candle_core::{DType, Device, Tensor, Var};
use selfsup_methods::*;
use selfsup_models::EncoderKind;

fn at() -> Placement {
    Placement::new(Device::Cpu, DType::F32)
}

fn views(n: usize, seed: u64) -> Vec<Tensor> {
    // Deterministic pseudo-random views without candle's unseedable generator.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    (0..2)
        .map(|_| {
            let v: Vec<f32> = (0..n * 3 * 16 * 16).map(|_| next()).collect();
            Tensor::from_vec(v, (n, 3, 16, 16), &Device::Cpu).unwrap()
        })
        .collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn perturb(var: &Var, step: usize) {
    let t = var.as_tensor();
    let n = t.elem_count();
    let d: Vec<f32> = (0..n)
        .map(|i| (((i * 7 + step * 13) % 17) as f32 - 8.0) * 1e-2)
        .collect();
    let d = Tensor::from_vec(d, t.shape(), t.device()).unwrap();
    var.set(&(t + d).unwrap()).unwrap();
}

#[test]
fn byol_target_is_the_ema_of_the_online_network() {
    let cfg = ByolConfig {
        hidden_dim: 32,
        out_dim: 16,
        pred_hidden: 32,
        momentum: Momentum {
            base: 0.9,
            cosine: true,
        },
    };
    let mut m = Byol::new(&EncoderKind::SmallCnn, &cfg, 1, &at()).unwrap();
    let pairs: Vec<(Var, Var)> = m.target_pairs().to_vec();
    assert!(pairs.len() > 10);
    // Starts as a copy.
    for (o, t) in &pairs {
        assert_eq!(vals(o.as_tensor()), vals(t.as_tensor()));
    }
    let total = 5;
    let mut expect: Vec<Vec<f32>> = pairs.iter().map(|(_, t)| vals(t.as_tensor())).collect();
    for k in 0..3u64 {
        // Stand-in for an optimiser step: move every online parameter.
        for (o, _) in &pairs {
            perturb(o, k as usize);
        }
        m.after_step(k, total).unwrap();
        let mom = momentum_at(cfg.momentum, k, total) as f32;
        for ((o, t), e) in pairs.iter().zip(expect.iter_mut()) {
            for (x, y) in e.iter_mut().zip(vals(o.as_tensor())) {
                *x = *x * mom + y * (1.0 - mom);
            }
            let got = vals(t.as_tensor());
            for (g, w) in got.iter().zip(e.iter()) {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }
    // The schedule really moved: m_1 differs from m_0.
    assert!(momentum_at(cfg.momentum, 1, total) > 0.9);
}

#[test]
fn moco_queue_is_fifo_of_earlier_keys() {
    let cfg = MocoConfig {
        hidden_dim: 32,
        out_dim: 8,
        queue_size: 10,
        ..Default::default()
    };
    let mut m = Moco::new(&EncoderKind::SmallCnn, &cfg, 2, &at()).unwrap();
    let initial = m.queue().unwrap().to_vec2::<f32>().unwrap();
    let mut rows = initial.clone();
    let mut ptr = 0;
    for step in 0..4u64 {
        let v = views(4, step);
        let before = m.queue().unwrap().to_vec2::<f32>().unwrap();
        let out = m.forward_loss(&v, None).unwrap();
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
        // The forward pass does not touch the queue: the loss used keys of earlier steps only.
        assert_eq!(m.queue().unwrap().to_vec2::<f32>().unwrap(), before);
        let keys = m.keys(&v[1]).unwrap().to_vec2::<f32>().unwrap();
        m.after_step(step, 100).unwrap();
        for k in keys {
            rows[ptr] = k;
            ptr = (ptr + 1) % 10;
        }
        let q = m.queue().unwrap().to_vec2::<f32>().unwrap();
        for (i, (a, b)) in q.iter().zip(&rows).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "step {step} row {i}: {x} vs {y}");
            }
        }
        assert_eq!(m.queue_ptr().unwrap(), ptr);
    }
    // 16 keys through a queue of 10: it wrapped, and nothing of the initial queue is left.
    assert_eq!(ptr, 6);
    let q = m.queue().unwrap().to_vec2::<f32>().unwrap();
    assert!(q.iter().all(|r| !initial.contains(r)));
}

#[test]
fn target_branches_get_no_gradient() {
    // SimSiam: gradients reach the predictions only.
    let dev = Device::Cpu;
    let mk = |s: f32| {
        Var::from_tensor(
            &Tensor::arange(0f32, 24., &dev)
                .unwrap()
                .reshape((4, 6))
                .unwrap()
                .affine(0.1, s as f64)
                .unwrap()
                .sin()
                .unwrap(),
        )
        .unwrap()
    };
    let (p0, p1, z0, z1) = (mk(0.0), mk(1.0), mk(2.0), mk(3.0));
    let loss = simsiam_loss(
        p0.as_tensor(),
        p1.as_tensor(),
        z0.as_tensor(),
        z1.as_tensor(),
    )
    .unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(p0.as_tensor()).is_some() && g.get(p1.as_tensor()).is_some());
    assert!(g.get(z0.as_tensor()).is_none() && g.get(z1.as_tensor()).is_none());

    // BYOL and MoCo: the momentum networks get no gradient, the online ones do.
    let byol = Byol::new(
        &EncoderKind::SmallCnn,
        &ByolConfig {
            hidden_dim: 32,
            out_dim: 16,
            pred_hidden: 32,
            ..Default::default()
        },
        3,
        &at(),
    )
    .unwrap();
    let moco = Moco::new(
        &EncoderKind::SmallCnn,
        &MocoConfig {
            hidden_dim: 32,
            out_dim: 8,
            queue_size: 16,
            symmetric: true,
            ..Default::default()
        },
        3,
        &at(),
    )
    .unwrap();
    for m in [&byol as &dyn Method, &moco] {
        let out = m.forward_loss(&views(4, 9), None).unwrap();
        let g = out.loss.backward().unwrap();
        let data = m.varmap().data().lock().unwrap();
        let (mut online, mut target) = (0, 0);
        for (name, var) in data.iter() {
            let has = g.get(var.as_tensor()).is_some();
            if name.starts_with(TARGET_PREFIX) || name.starts_with(STATE_PREFIX) {
                assert!(!has, "{}: {name} got a gradient", m.name());
                target += 1;
            } else if name.starts_with("encoder.") && is_trainable(name) {
                assert!(has, "{}: {name} got no gradient", m.name());
                online += 1;
            }
        }
        assert!(online > 0 && target > 0);
        drop(data);
        // And the optimiser is not given them.
        assert!(m
            .trainable()
            .iter()
            .all(|n| !n.starts_with(TARGET_PREFIX) && !n.starts_with(STATE_PREFIX)));
    }
}

#[test]
fn rotation_labels_match_the_rotations_applied() {
    // A 5x5 image per sample with distinct pixels, rotated by the data crate as reference.
    let n = 8;
    let imgs: Vec<selfsup_data::Image> = (0..n)
        .map(|i| selfsup_data::Image {
            data: (0..75).map(|p| ((p * 3 + i * 11) % 251) as u8).collect(),
            channels: 3,
            height: 5,
            width: 5,
        })
        .collect();
    let to_tensor = |im: &selfsup_data::Image| {
        Tensor::from_vec(
            im.data.iter().map(|&b| b as f32).collect::<Vec<_>>(),
            (1, 3, 5, 5),
            &Device::Cpu,
        )
        .unwrap()
    };
    let batch = Tensor::cat(&imgs.iter().map(to_tensor).collect::<Vec<_>>(), 0).unwrap();
    let (x, labels) = rotation_batch(std::slice::from_ref(&batch)).unwrap();
    let labels: Vec<u32> = labels.to_vec1().unwrap();
    assert_eq!(labels, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    for (i, &k) in labels.iter().enumerate() {
        let want = selfsup_data::transforms::rotate90(imgs[i].clone(), k as usize);
        let got: Vec<u8> = vals(&x.get(i).unwrap()).iter().map(|&v| v as u8).collect();
        assert_eq!(got, want.data, "image {i} rotated by {k}");
    }
    // Non-square images are refused.
    let r = rotation_batch(&[Tensor::zeros((4, 3, 4, 6), DType::F32, &Device::Cpu).unwrap()]);
    assert!(r.unwrap_err().to_string().contains("square"));
}

#[test]
fn lab_of_primaries_matches_skimage() {
    // skimage.color.rgb2lab of pure colours (D65).
    let cases = [
        ([1.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032]),
        ([0.0, 1.0, 0.0], [87.7347, -86.1827, 83.1793]),
        ([0.0, 0.0, 1.0], [32.2970, 79.1875, -107.8602]),
        ([1.0, 1.0, 1.0], [100.0, 0.0, 0.0]),
        ([0.5, 0.5, 0.5], [53.3890, 0.0, 0.0]),
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
    ];
    for (rgb, lab) in cases {
        let t = Tensor::new(&rgb, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        let got = vals(&rgb_to_lab(&t).unwrap());
        for (g, w) in got.iter().zip(lab) {
            assert!((*g as f64 - w).abs() < 0.05, "{rgb:?}: {got:?} vs {lab:?}");
        }
    }
}

#[test]
fn pair_sampler_respects_labels() {
    let labels = [0u32, 1, 0, 2, 1, 1, 2, 0];
    let s = PairSampler { use_labels: true };
    let p = s.sample(8, Some(&labels)).unwrap();
    for i in 0..8 {
        let (pi, ni) = (p.positive[i] as usize, p.negative[i] as usize);
        assert_eq!(labels[pi], labels[i]);
        assert_ne!(pi, i, "another image of the same label exists");
        assert_ne!(labels[ni], labels[i]);
    }
    let free = PairSampler::default().sample(4, None).unwrap();
    assert_eq!(free.positive, vec![0, 1, 2, 3]);
    assert_eq!(free.negative, vec![1, 2, 3, 0]);
    assert!(s.sample(8, None).is_err());
    assert!(PairSampler::default().sample(1, None).is_err());
}

#[test]
fn hybrid_adds_the_weighted_pretext_loss() {
    let base = SimClr::new(
        &EncoderKind::SmallCnn,
        &SimClrConfig {
            hidden_dim: 32,
            out_dim: 16,
            temperature: 0.5,
        },
        4,
        &at(),
    )
    .unwrap();
    let h = Hybrid::new(
        Box::new(base),
        0.25,
        5,
        &at(),
        "rotation_head",
        Box::new(|d, vb| Ok(Box::new(Rotation::new(d, 32, vb)?) as Box<dyn Pretext>)),
    )
    .unwrap();
    assert_eq!(h.name(), "simclr+rotation");
    assert!(h
        .trainable()
        .iter()
        .any(|n| n.starts_with("rotation_head.")));
    let out = h.forward_loss(&views(8, 1), None).unwrap();
    let get = |k: &str| out.metrics.iter().find(|m| m.0 == k).unwrap().1;
    let total = out.loss.to_scalar::<f32>().unwrap() as f64;
    let want = get("base_loss") + 0.25 * get("aux_loss");
    assert!((total - want).abs() < 1e-5, "{total} vs {want}");
    assert!(get("rot_acc") >= 0.0);
}

#[test]
fn moco_loss_goes_down_once_the_queue_holds_real_keys() {
    // 32 distinct images, two noisy views each per step; a queue of one batch.
    let cfg = MocoConfig {
        hidden_dim: 64,
        out_dim: 32,
        queue_size: 32,
        temperature: 0.2,
        ..Default::default()
    };
    let mut m = Moco::new(&EncoderKind::SmallCnn, &cfg, 2, &at()).unwrap();
    let names = m.trainable();
    let vars: Vec<Var> = {
        let d = m.varmap().data().lock().unwrap();
        names.iter().map(|n| d[n].clone()).collect()
    };
    use candle_nn::Optimizer;
    let mut opt = candle_nn::AdamW::new_lr(vars, 2e-3).unwrap();
    let base = views(32, 100)[0].clone();
    let mut losses = Vec::new();
    for step in 0..30u64 {
        let noise = views(32, step);
        let v: Vec<Tensor> = noise
            .iter()
            .map(|n| (&base + (n * 0.3).unwrap()).unwrap())
            .collect();
        let out = m.forward_loss(&v, None).unwrap();
        opt.backward_step(&out.loss).unwrap();
        m.after_step(step, 30).unwrap();
        losses.push(out.loss.to_scalar::<f32>().unwrap());
    }
    eprintln!("MoCo losses: {losses:?}");
    // The first steps are measured against the random initial queue (easy negatives); once it
    // holds real keys (after step 1) the loss peaks, then falls as the encoder learns.
    let peak = losses[..10].iter().cloned().fold(0f32, f32::max);
    let end = losses[25..].iter().sum::<f32>() / 5.0;
    assert!(end < peak - 0.3, "peak {peak}, end {end}");
}

#[test]
fn symmetric_moco_never_puts_both_views_of_an_image_in_one_batch_norm_batch() {
    // The query of view 0 must not depend on view 1: with both views in one BatchNorm batch it
    // would (the batch statistics carry the other view, the leak shuffle-BN prevents).
    for symmetric in [true, false] {
        let moco = Moco::new(
            &EncoderKind::SmallCnn,
            &MocoConfig {
                hidden_dim: 32,
                out_dim: 8,
                queue_size: 16,
                symmetric,
                ..Default::default()
            },
            3,
            &at(),
        )
        .unwrap();
        let a = views(4, 1);
        let b = views(4, 2);
        let q = |v1: &Tensor| {
            let out = moco
                .forward_loss(&[a[0].clone(), v1.clone()], None)
                .unwrap();
            out.embeddings
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(q(&a[1]), q(&b[1]), "symmetric {symmetric}");
    }
}
