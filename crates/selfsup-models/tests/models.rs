//! Encoders agree with PyTorch (fixtures from fixtures/make_model_fixtures.py), train and eval.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use selfsup_models::layers::{is_buffer, max_pool2d};
use selfsup_models::{build_encoder, io, seeded_var_builder, EncoderKind};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| / max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    max_abs_diff(a, b) / scale
}

fn check(case: &str, kind: &str) {
    let kind: EncoderKind = kind.parse().unwrap();
    let varmap = VarMap::new();
    let enc = build_encoder(
        &kind,
        seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let path = fixture(&format!("{case}.safetensors"));
    let scratch = tempfile::tempdir().unwrap();
    io::load_varmap(&varmap, "", &{
        // The fixture stores weights as `model.<name>`: load through a prefixed copy.
        let t = io::read_tensors(&path).unwrap();
        let tmp = scratch.path().join("weights.safetensors");
        let w: std::collections::HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone())))
            .collect();
        io::save_tensors(&w, &tmp).unwrap();
        tmp
    })
    .unwrap();
    let t = io::read_tensors(&path).unwrap();
    let x = &t["input"];
    let out_train = enc.forward_t(x, true).unwrap();
    // Relative to the output's scale: deep nets in train mode amplify float rounding.
    let d = rel_diff(&out_train, &t["out_train"]);
    assert!(
        d < 1e-4,
        "{case}: train-mode output differs by {d} (relative)"
    );
    assert_eq!(out_train.dims()[1], enc.feature_dim());
    // Running statistics after one train-mode call.
    let data = varmap.data().lock().unwrap();
    let mut n_buf = 0;
    for (k, v) in t.iter().filter(|(k, _)| k.starts_with("after.")) {
        let name = &k["after.".len()..];
        let d = rel_diff(data[name].as_tensor(), v);
        assert!(d < 1e-4, "{case}: {name} differs by {d} after a train step");
        n_buf += 1;
    }
    assert!(n_buf > 0);
    drop(data);
    let out_eval = enc.forward_t(x, false).unwrap();
    let d = rel_diff(&out_eval, &t["out_eval"]);
    assert!(d < 1e-4, "{case}: eval-mode output differs by {d}");
    // Eval mode changes no statistics.
    let before = io::named_tensors(&varmap);
    enc.forward_t(x, false).unwrap();
    for ((_, a), (_, b)) in before.iter().zip(io::named_tensors(&varmap)) {
        assert_eq!(max_abs_diff(a, &b), 0.0);
    }
}

#[test]
fn small_cnn_matches_pytorch() {
    check("small_cnn", "small-cnn");
}

#[test]
fn resnet18_cifar_stem_matches_pytorch() {
    check("resnet18_cifar_w0125", "resnet18-cifar-w0.125");
}

#[test]
fn resnet18_imagenet_stem_matches_pytorch() {
    check("resnet18_imagenet_w0125", "resnet18-imagenet-w0.125");
}

#[test]
fn small_cnn_at_other_widths_matches_pytorch() {
    check("small_cnn_w05_d48", "small-cnn-w0.5-d48");
}

#[test]
fn small_cnn_with_two_max_pools_matches_pytorch() {
    check("small_cnn_w05_p2", "small-cnn-w0.5-p2");
}

#[test]
fn small_cnn_widths_parse_and_refuse_nonsense() {
    assert_eq!(
        "small-cnn-w1".parse::<EncoderKind>().unwrap(),
        EncoderKind::SmallCnn
    );
    assert_eq!(
        "small-cnn-w1.5".parse::<EncoderKind>().unwrap(),
        EncoderKind::SmallCnnWidths([48, 96, 192, 384])
    );
    assert_eq!(
        "small-cnn-w2-d256".parse::<EncoderKind>().unwrap(),
        EncoderKind::SmallCnnWidths([64, 128, 256, 256])
    );
    assert_eq!(
        "small-cnn-p3".parse::<EncoderKind>().unwrap(),
        EncoderKind::SmallCnn
    );
    assert_eq!(
        "small-cnn-p2".parse::<EncoderKind>().unwrap(),
        EncoderKind::SmallCnnPools {
            widths: [32, 64, 128, 256],
            pools: 2
        }
    );
    let vm = VarMap::new();
    let enc = build_encoder(
        &"small-cnn-d512".parse().unwrap(),
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(enc.feature_dim(), 512);
    let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.features(&x).unwrap().dims(), &[2, 512]);
    for (bad, want) in [
        ("small-cnn-w0", "width multiplier"),
        ("small-cnn-wx", "width multiplier"),
        ("small-cnn-w1e9", "width multiplier"),
        ("small-cnn-d0", "feature dimension"),
        ("small-cnn-d-3", "feature dimension"),
        ("small-cnn-cifar", "unknown small-cnn option"),
        ("small-cnn-p4", "max-pool count"),
        ("small-cnn-px", "max-pool count"),
    ] {
        let e = bad.parse::<EncoderKind>().unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn resnet50_bottleneck_matches_pytorch() {
    check("resnet50_cifar_w00625", "resnet50-cifar-w0.0625");
}

#[test]
fn parameter_counts_equal_torchvision() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap())
            .unwrap();
    for (name, n) in want.as_object().unwrap() {
        let varmap = VarMap::new();
        build_encoder(
            &name.parse().unwrap(),
            seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let got: usize = io::named_tensors(&varmap)
            .iter()
            .filter(|(k, _)| !is_buffer(k))
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(got as u64, n.as_u64().unwrap(), "{name}");
    }
}

#[test]
fn seeded_init_is_reproducible_and_pytorch_like() {
    let weights = |seed| {
        let vm = VarMap::new();
        build_encoder(
            &EncoderKind::SmallCnn,
            seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu),
        )
        .unwrap();
        io::named_tensors(&vm)
    };
    let (a, b, c) = (weights(1), weights(1), weights(2));
    for ((ka, ta), (_, tb)) in a.iter().zip(&b) {
        assert_eq!(max_abs_diff(ta, tb), 0.0, "{ka}");
    }
    let w1 = &a.iter().find(|(k, _)| k == "conv2.weight").unwrap().1;
    let w2 = &c.iter().find(|(k, _)| k == "conv2.weight").unwrap().1;
    assert!(max_abs_diff(w1, w2) > 0.0);
    // PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 32 * 9; std = bound / sqrt(3).
    let bound = 1.0 / (32.0f32 * 9.0).sqrt();
    let v: Vec<f32> = w1.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.abs() <= bound));
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!(
        (std - bound / 3f32.sqrt()).abs() < 0.02 * bound,
        "std {std}"
    );
    // BN starts at weight 1, bias 0, running var 1.
    let bn = &a.iter().find(|(k, _)| k == "bn1.running_var").unwrap().1;
    assert_eq!(bn.to_vec1::<f32>().unwrap(), vec![1.0; 32]);
}

#[test]
fn strided_max_pool_has_gradients_and_matches_candle() {
    let x =
        Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 9, 9), &Device::Cpu).unwrap()).unwrap();
    // kernel == stride: same as candle's op.
    let a = max_pool2d(x.as_tensor(), 3, 3, 0).unwrap();
    let b = x.as_tensor().max_pool2d(3).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // 3x3 stride 2 padding 1: forward equals a direct loop, gradient is 1 at each argmax.
    let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
    assert_eq!(y.dims(), &[2, 3, 5, 5]);
    let xv: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let mut want_grad = vec![0f32; xv.len()];
    for p in 0..6 {
        for oy in 0..5 {
            for ox in 0..5 {
                let mut best = (f32::NEG_INFINITY, 0);
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                        if (0..9).contains(&iy) && (0..9).contains(&ix) {
                            let i = p * 81 + iy as usize * 9 + ix as usize;
                            if xv[i] > best.0 {
                                best = (xv[i], i);
                            }
                        }
                    }
                }
                assert_eq!(yv[p * 25 + oy * 5 + ox], best.0);
                want_grad[best.1] += 1.0;
            }
        }
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    let gv: Vec<f32> = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(gv, want_grad);
}

#[test]
fn save_load_round_trip_and_wrong_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let vm = VarMap::new();
    let kind: EncoderKind = "resnet18-w0.125".parse().unwrap();
    let enc = build_encoder(&kind, seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu)).unwrap();
    io::save_varmap(&vm, "", &p).unwrap();
    let vm2 = VarMap::new();
    let enc2 = build_encoder(&kind, seeded_var_builder(&vm2, 4, DType::F32, &Device::Cpu)).unwrap();
    io::load_varmap(&vm2, "", &p).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &enc.forward_t(&x, false).unwrap(),
            &enc2.forward_t(&x, false).unwrap()
        ),
        0.0
    );
    // Another architecture: a clear error naming a tensor.
    let vm3 = VarMap::new();
    build_encoder(
        &EncoderKind::SmallCnn,
        seeded_var_builder(&vm3, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let e = io::load_varmap(&vm3, "", &p).unwrap_err().to_string();
    assert!(
        e.contains("has shape") && e.contains("another architecture"),
        "{e}"
    );
    let e = io::load_varmap(&vm3, "", &dir.path().join("nope.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    // Unknown names are errors, not panics.
    assert!("resnet19".parse::<EncoderKind>().is_err());
    assert!("resnet18-w0"
        .parse::<EncoderKind>()
        .map(|k| build_encoder(
            &k,
            seeded_var_builder(&VarMap::new(), 0, DType::F32, &Device::Cpu)
        )
        .is_err())
        .unwrap());
}

#[test]
fn convnet_seed_shapes() {
    let vm = VarMap::new();
    let enc = build_encoder(
        &EncoderKind::ConvnetSeed,
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(enc.forward_t(&x, true).unwrap().dims(), &[2, 128]);
    let w = vm.data().lock().unwrap()["fc.weight"]
        .as_tensor()
        .dims()
        .to_vec();
    assert_eq!(w, vec![128, 64 * 14 * 14]);
    let bad = Tensor::randn(0f32, 1., (2, 3, 28, 28), &Device::Cpu).unwrap();
    assert!(enc.forward_t(&bad, true).is_err());
}

#[test]
fn heads_follow_lightlys_layout() {
    use selfsup_models::heads::*;
    use selfsup_models::Head;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let h = Head::new(&simclr_projection(256, 512, 128), vb.pp("projection_head")).unwrap();
    assert_eq!(h.out_dim(), 128);
    let names: Vec<(String, Vec<usize>)> = io::named_tensors(&vm)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    // nn.Sequential(Linear(256, 512, bias=False), BatchNorm1d(512), ReLU(), Linear(512, 128)).
    let want = [
        ("projection_head.layers.0.weight", vec![512, 256]),
        ("projection_head.layers.1.bias", vec![512]),
        ("projection_head.layers.1.running_mean", vec![512]),
        ("projection_head.layers.1.running_var", vec![512]),
        ("projection_head.layers.1.weight", vec![512]),
        ("projection_head.layers.3.bias", vec![128]),
        ("projection_head.layers.3.weight", vec![128, 512]),
    ];
    assert_eq!(
        names,
        want.iter()
            .map(|(k, s)| (k.to_string(), s.clone()))
            .collect::<Vec<_>>()
    );
    // BatchNorm1d really normalises in train mode: each output column of the first block has
    // zero mean before the ReLU... so after ReLU the head output is finite and depends on the batch.
    let x = Tensor::randn(0f32, 3., (16, 256), &Device::Cpu).unwrap();
    let y = h.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[16, 128]);
    // SimSiam projector: three linear layers, each with BN, no bias before BN, and no scale or
    // shift in the last BN: exactly the keys of lightly 1.6's
    // `sorted(SimSiamProjectionHead(64, 32, 16).state_dict())` (less num_batches_tracked).
    let vm = VarMap::new();
    let h = Head::new(
        &simsiam_projection(64, 32, 16),
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let keys: Vec<String> = io::named_tensors(&vm).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "layers.0.weight",
            "layers.1.bias",
            "layers.1.running_mean",
            "layers.1.running_var",
            "layers.1.weight",
            "layers.3.weight",
            "layers.4.bias",
            "layers.4.running_mean",
            "layers.4.running_var",
            "layers.4.weight",
            "layers.6.weight",
            "layers.7.running_mean",
            "layers.7.running_var"
        ]
    );
    // In training, each output column is standardised (mean 0, variance 1: no affine part).
    let y = h
        .forward_t(
            &Tensor::randn(0f32, 3., (32, 64), &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
    let mean: Vec<f32> = y.mean(0).unwrap().to_vec1().unwrap();
    let var: Vec<f32> = y.sqr().unwrap().mean(0).unwrap().to_vec1().unwrap();
    assert!(mean.iter().all(|m| m.abs() < 1e-4), "{mean:?}");
    assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-2), "{var:?}");
    // Linear classifier has a bias.
    let vm = VarMap::new();
    Head::new(
        &linear_classifier(64, 10),
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(io::named_tensors(&vm).len(), 2);
}

/// Writes selfsup-initialised weights and an input/output pair for
/// fixtures/check_load_in_pytorch.py when `SELFSUP_EXPORT_DIR` is set.
#[test]
fn export_for_pytorch() {
    let Ok(dir) = std::env::var("SELFSUP_EXPORT_DIR") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (name, kind) in [
        ("small_cnn", "small-cnn"),
        ("resnet18_cifar_w0125", "resnet18-cifar-w0.125"),
        ("resnet18_imagenet_w0125", "resnet18-imagenet-w0.125"),
    ] {
        let vm = VarMap::new();
        let enc = build_encoder(
            &kind.parse().unwrap(),
            seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        enc.forward_t(&x, true).unwrap(); // move the running statistics off their initial values
        let y = enc.forward_t(&x, false).unwrap();
        io::save_varmap(
            &vm,
            "",
            &Path::new(&dir).join(format!("{name}.safetensors")),
        )
        .unwrap();
        let mut m = std::collections::HashMap::new();
        m.insert("input".to_string(), x);
        m.insert("output".to_string(), y);
        io::save_tensors(&m, &Path::new(&dir).join(format!("{name}.io.safetensors"))).unwrap();
    }
}

#[test]
fn composed_and_fused_batch_norm_agree() {
    // Affine f32 on the CPU takes the fused kernel; a non-affine norm takes the composed path.
    // With weight 1 and bias 0 both must give the same outputs and running statistics.
    use selfsup_models::layers::{batch_norm, batch_norm_opts};
    let x = (Tensor::randn(0f32, 2., (6, 4, 3, 3), &Device::Cpu).unwrap() + 1.0).unwrap();
    let vm1 = VarMap::new();
    let fused = batch_norm(4, seeded_var_builder(&vm1, 0, DType::F32, &Device::Cpu)).unwrap();
    let vm2 = VarMap::new();
    let composed = batch_norm_opts(
        4,
        false,
        seeded_var_builder(&vm2, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let a = fused.forward_t(&x, true).unwrap();
    let b = composed.forward_t(&x, true).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
    for (ra, rb) in [
        (&fused.running_mean, &composed.running_mean),
        (&fused.running_var, &composed.running_var),
    ] {
        assert!(max_abs_diff(ra.as_tensor(), rb.as_tensor()) < 1e-5);
        assert!(
            max_abs_diff(
                ra.as_tensor(),
                &Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()
            ) > 1e-3
        );
    }
}

#[test]
fn eval_batch_norm_fused_matches_the_formula_values_and_gradients() {
    // Eval mode on the CPU folds the running statistics into one scale/shift op (with the ReLU):
    // it must equal (x - mean) / sqrt(var + eps) * w + b (then ReLU), gradients included.
    use selfsup_models::layers::batch_norm;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = batch_norm(3, seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    bn.running_mean
        .set(&Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap())
        .unwrap();
    bn.running_var
        .set(&Tensor::new(&[0.25f32, 4.0, 1.5], &dev).unwrap())
        .unwrap();
    let wv =
        candle_core::Var::from_tensor(&Tensor::new(&[1.5f32, -0.5, 0.8], &dev).unwrap()).unwrap();
    let bv =
        candle_core::Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, -0.3], &dev).unwrap()).unwrap();
    let bn = selfsup_models::layers::BatchNorm {
        weight: Some(wv.as_tensor().clone()),
        bias: Some(bv.as_tensor().clone()),
        ..bn
    };
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 2., (4, 3, 5, 5), &dev).unwrap())
        .unwrap();
    for relu in [false, true] {
        let ours = bn.forward_act(x.as_tensor(), false, relu).unwrap();
        let shape = (1, 3, 1, 1);
        let rm = bn.running_mean.as_tensor().reshape(shape).unwrap();
        let rv = bn.running_var.as_tensor().reshape(shape).unwrap();
        let mut want = x
            .as_tensor()
            .broadcast_sub(&rm)
            .unwrap()
            .broadcast_div(&(rv + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&wv.as_tensor().reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&bv.as_tensor().reshape(shape).unwrap())
            .unwrap();
        if relu {
            want = want.relu().unwrap();
        }
        assert!(max_abs_diff(&ours, &want) < 1e-5, "relu {relu}: values");
        let r = Tensor::randn(0f32, 1., (4, 3, 5, 5), &dev).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &wv, &bv] {
            let d = max_abs_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "relu {relu}: gradient differs by {d}");
        }
    }
}

/// Standard normal f32 values from `seed`.
fn seeded_normal(shape: impl Into<candle_core::Shape>, seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let shape = shape.into();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_resnet_gradients_match_the_composed_f64_path() {
    // f32 on the CPU takes the fused ops (bn-relu-conv, bn-add-relu, bn-add-bn-relu,
    // bn-relu-max-pool); f64 takes candle's composed BatchNorm and ReLU and the separate max
    // pool. Same seed, same input: every parameter's gradient and every running statistic must
    // agree. Bottleneck blocks (resnet50) have two bn-relu-conv ops each; all ResNets have
    // projection shortcuts; small-cnn and the ImageNet stem end layers in a max pool.
    for kind in [
        "resnet18-cifar-w0.125",
        "resnet18-imagenet-w0.125",
        "resnet50-cifar-w0.0625",
        "small-cnn",
    ] {
        let kind: EncoderKind = kind.parse().unwrap();
        let build = |dtype| {
            let vm = VarMap::new();
            let enc =
                build_encoder(&kind, seeded_var_builder(&vm, 7, dtype, &Device::Cpu)).unwrap();
            (vm, enc)
        };
        let (vm32, enc32) = build(DType::F32);
        let (vm64, enc64) = build(DType::F64);
        // Seeded inputs: with random ones, about one draw in ten puts a ReLU input or a
        // max-pool pair within f32 rounding of a tie in these 4-channel nets (BatchNorm over
        // 4-16 values), where f32 and f64 route a gradient differently by a few percent.
        let x = seeded_normal((4, 3, 16, 16), 1);
        let y32 = enc32.forward_t(&x, true).unwrap();
        let y64 = enc64
            .forward_t(&x.to_dtype(DType::F64).unwrap(), true)
            .unwrap();
        let r = seeded_normal(y32.shape().clone(), 2);
        let g32 = (y32 * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let r64 = r.to_dtype(DType::F64).unwrap();
        let g64 = (y64 * r64).unwrap().sum_all().unwrap().backward().unwrap();
        let (d32, d64) = (vm32.data().lock().unwrap(), vm64.data().lock().unwrap());
        let mut checked = 0;
        for (name, v) in d32.iter() {
            let w = &d64[name];
            let as32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            if is_buffer(name) {
                let d = rel_diff(v.as_tensor(), &as32(w.as_tensor()));
                assert!(
                    d < 1e-4,
                    "{kind:?} {name}: running statistic differs by {d}"
                );
                continue;
            }
            let a = g32.get(v.as_tensor()).unwrap();
            let b = as32(g64.get(w.as_tensor()).unwrap());
            let d = rel_diff(a, &b);
            assert!(d < 1e-3, "{kind:?} {name}: gradient differs by {d}");
            checked += 1;
        }
        assert!(checked >= 12, "only {checked} gradients compared");
    }
}

#[test]
fn features_equal_the_eval_forward_without_a_graph() {
    for kind in [
        "small-cnn",
        "resnet18-cifar-w0.125",
        "resnet18-imagenet-w0.125",
        "convnet-seed",
    ] {
        let kind: EncoderKind = kind.parse().unwrap();
        let vm = VarMap::new();
        let enc =
            build_encoder(&kind, seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::randn(0f32, 1., (3, 3, 32, 32), &Device::Cpu).unwrap();
        // Move the running statistics away from their initial values first.
        enc.forward_t(&x, true).unwrap();
        let a = enc.forward_t(&x, false).unwrap();
        let f = enc.features(&x).unwrap();
        assert_eq!(max_abs_diff(&a, &f), 0.0, "{kind:?}");
        assert!(a.track_op(), "{kind:?}: the eval forward keeps its graph");
        assert!(!f.track_op(), "{kind:?}: features carry no graph");
    }
}
