//! Optimisers against torch.optim (fixtures/make_optim_fixtures.py) on fixed gradients, and the
//! learning-rate schedule.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use selfsup_train::optim::{lr_at, Optim, OptimConfig, OptimizerKind, Param};
use serde_json::Value;

fn t(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = match v.as_array().unwrap()[0] {
        Value::Array(_) => v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect(),
        _ => vec![v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()],
    };
    let (r, c) = (rows.len(), rows[0].len());
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    let t = Tensor::from_vec(flat, (r, c), &Device::Cpu).unwrap();
    if v.as_array().unwrap()[0].is_array() {
        t
    } else {
        t.squeeze(0).unwrap()
    }
}

/// A weight `w` (decayed, LARS-adapted) and a bias `b` (neither).
fn weight_and_bias(w: &Var, b: &Var) -> Vec<Param> {
    vec![
        Param {
            name: "w".into(),
            var: w.clone(),
            decay: true,
        },
        Param {
            name: "b".into(),
            var: b.clone(),
            decay: false,
        },
    ]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn optimisers_match_torch_on_fixed_gradients() {
    torch_cases(DType::F64, 1e-12);
}

/// f32 parameters take SGD's and LARS's own loops (AdamW the tensor ops): the same
/// trajectories to f32 precision.
#[test]
fn f32_optimisers_match_torch_on_fixed_gradients() {
    torch_cases(DType::F32, 2e-6);
}

fn torch_cases(dtype: DType, tol: f64) {
    let t = |v: &Value| t(v).to_dtype(dtype).unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| max_diff(&a.to_dtype(DType::F64).unwrap(), b);
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for case in doc["cases"].as_array().unwrap() {
        let kind: OptimizerKind = case["kind"].as_str().unwrap().parse().unwrap();
        let c = &case["config"];
        let mut cfg = OptimConfig::defaults(kind);
        cfg.momentum = c["momentum"].as_f64().unwrap();
        cfg.weight_decay = c["weight_decay"].as_f64().unwrap();
        cfg.nesterov = c["nesterov"].as_bool().unwrap_or(false);
        if let Some(e) = c["eta"].as_f64() {
            cfg.eta = e;
        }
        if let Some(e) = c["eps"].as_f64() {
            cfg.eps = e;
        }
        let w = Var::from_tensor(&t(&doc["w0"])).unwrap();
        let b = Var::from_tensor(&t(&doc["b0"])).unwrap();
        let params = weight_and_bias(&w, &b);
        let mut opt = Optim::new(cfg, params).unwrap();
        for (k, (g, lr)) in doc["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(doc["lrs"].as_array().unwrap())
            .enumerate()
        {
            let mut gs = GradStore::default();
            gs.insert(w.as_tensor(), t(&g["w"]));
            gs.insert(b.as_tensor(), t(&g["b"]));
            opt.step(&gs, lr.as_f64().unwrap(), 1.0).unwrap();
            let want = &case["trajectory"][k];
            let dw = max_diff(w.as_tensor(), &self::t(&want["w"]));
            let db = max_diff(b.as_tensor(), &self::t(&want["b"]));
            assert!(
                dw < tol && db < tol,
                "{kind:?} {c}: step {k} differs by {dw:e} / {db:e}"
            );
        }
    }
}

#[test]
fn state_round_trip_continues_identically() {
    let mk = || {
        let w = Var::from_tensor(
            &Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )
        .unwrap();
        (
            w.clone(),
            Optim::new(
                OptimConfig::defaults(OptimizerKind::Adamw),
                vec![Param {
                    name: "w".into(),
                    var: w,
                    decay: true,
                }],
            )
            .unwrap(),
        )
    };
    let grad = |w: &Var| {
        let mut g = GradStore::default();
        g.insert(w.as_tensor(), w.as_tensor().sin().unwrap());
        g
    };
    let (w1, mut o1) = mk();
    for _ in 0..4 {
        o1.step(&grad(&w1), 0.1, 1.0).unwrap();
    }
    let (w2, mut o2) = mk();
    for _ in 0..2 {
        o2.step(&grad(&w2), 0.1, 1.0).unwrap();
    }
    let (w3, mut o3) = mk();
    w3.set(w2.as_tensor()).unwrap();
    o3.load_state(o2.state_tensors(), o2.steps()).unwrap();
    for _ in 0..2 {
        o3.step(&grad(&w3), 0.1, 1.0).unwrap();
    }
    assert_eq!(
        w1.as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        w3.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

#[test]
fn warmup_then_cosine() {
    let (total, warm, base) = (100, 10, 1.0);
    assert!((lr_at(0, total, warm, base, 0.0) - 0.1).abs() < 1e-12);
    assert!((lr_at(9, total, warm, base, 0.0) - 1.0).abs() < 1e-12);
    assert!((lr_at(10, total, warm, base, 0.0) - 1.0).abs() < 1e-12);
    // Cosine from step 10 (progress 0) to step 99 (progress 1): the last step is at min_lr.
    let mid = 0.5 * (1.0 + (std::f64::consts::PI * 45.0 / 89.0).cos());
    assert!((lr_at(55, total, warm, base, 0.0) - mid).abs() < 1e-12);
    assert_eq!(lr_at(99, total, warm, base, 0.01), 0.01);
    assert!((1..100).all(|s| lr_at(s, total, warm, base, 0.0)
        <= lr_at(s - 1, total, warm, base, 0.0)
        || s <= warm));
    assert_eq!(lr_at(9, 10, 0, 2.0, 0.3), 0.3);
    assert!((lr_at(0, 10, 0, 2.0, 0.0) - 2.0).abs() < 1e-12);
    assert!(Optim::new(
        OptimConfig {
            momentum: 1.5,
            ..OptimConfig::defaults(OptimizerKind::Sgd)
        },
        vec![]
    )
    .is_err());
}

#[test]
fn optimiser_state_holds_no_graph() {
    // A gradient that still references the forward graph (as candle's leaf gradients can) must
    // not be kept alive through the momentum buffers: that leaked every step's activations.
    let w = Var::from_tensor(&Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::Adamw,
        OptimizerKind::Lars,
    ] {
        let mut o = Optim::new(
            OptimConfig::defaults(kind),
            vec![Param {
                name: "w".into(),
                var: w.clone(),
                decay: true,
            }],
        )
        .unwrap();
        for _ in 0..3 {
            let mut g = GradStore::default();
            let tracked = (w.as_tensor() * 2.0).unwrap();
            assert!(tracked.track_op());
            g.insert(w.as_tensor(), tracked);
            o.step(&g, 0.1, 1.0).unwrap();
        }
        for (k, t) in o.state_tensors() {
            assert!(!t.track_op(), "{kind:?}: state {k} keeps an op graph");
        }
    }
}

#[test]
fn biases_and_norm_parameters_take_the_bias_learning_rate_scale() {
    // Barlow Twins trains biases and BatchNorm parameters at 0.024 of the weights' rate.
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::Lars,
        OptimizerKind::Adamw,
    ] {
        let var = |v: f32| Var::from_tensor(&Tensor::full(v, 3, &Device::Cpu).unwrap()).unwrap();
        let (w, b) = (var(1.0), var(1.0));
        let mut o = Optim::new(
            OptimConfig {
                momentum: 0.0,
                weight_decay: 0.0,
                eta: 1.0,
                bias_lr_scale: 0.25,
                ..OptimConfig::defaults(kind)
            },
            weight_and_bias(&w, &b),
        )
        .unwrap();
        let loss = (w.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
        o.step(&loss.backward().unwrap(), 0.1, 1.0).unwrap();
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0];
        // LARS rescales only the decayed weight's step (eta ||w|| / ||g|| = 1 here).
        assert!(
            (moved(&b) - 0.25 * moved(&w)).abs() < 1e-6,
            "{kind:?}: {} vs {}",
            moved(&b),
            moved(&w)
        );
    }
}

/// LARS's f32 loops against the f64 tensor formulation on a projector-sized weight and a
/// bias over many steps: the same trajectory to f32 precision.
#[test]
fn f32_lars_follows_the_f64_formulation_on_large_parameters() {
    let dev = Device::Cpu;
    let run = |dtype: DType| {
        let w = Var::from_tensor(
            &Tensor::from_vec(
                (0..512 * 256)
                    .map(|i| (((i as u64 * 7919) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
                    .collect::<Vec<f32>>(),
                (512, 256),
                &dev,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(&Tensor::zeros(512, dtype, &dev).unwrap()).unwrap();
        let mut cfg = OptimConfig::defaults(OptimizerKind::Lars);
        cfg.weight_decay = 1e-6;
        let params = weight_and_bias(&w, &b);
        let mut opt = Optim::new(cfg, params).unwrap();
        for k in 0..30u64 {
            // Deterministic pseudo-random gradients, the same for both precisions.
            let gw: Vec<f32> = (0..512 * 256)
                .map(|i| (((i as u64 * 2654435761 + k * 97) % 1000) as f32 / 1000.0 - 0.5) * 1e-3)
                .collect();
            let gb: Vec<f32> = (0..512)
                .map(|i| (((i as u64 * 40503 + k * 13) % 1000) as f32 / 1000.0 - 0.5) * 1e-2)
                .collect();
            let mut gs = GradStore::default();
            gs.insert(
                w.as_tensor(),
                Tensor::from_vec(gw, (512, 256), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            gs.insert(
                b.as_tensor(),
                Tensor::from_vec(gb, 512, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            opt.step(&gs, 0.3, 1.0).unwrap();
        }
        (
            w.as_tensor().to_dtype(DType::F64).unwrap(),
            b.as_tensor().to_dtype(DType::F64).unwrap(),
        )
    };
    let (w32, b32) = run(DType::F32);
    let (w64, b64) = run(DType::F64);
    let dw = max_diff(&w32, &w64);
    let db = max_diff(&b32, &b64);
    let moved = max_diff(&w64, &run(DType::F64).0);
    assert_eq!(moved, 0.0);
    assert!(
        dw < 1e-5 && db < 1e-5,
        "f32 loops differ by {dw:e} / {db:e}"
    );
}
