//! Loss values and gradients against PyTorch/lightly (fixtures/make_loss_fixtures.py), in f64
//! and f32, plus stability and error paths.

use candle_core::{DType, Device, Tensor, Var};
use selfsup_losses::*;
use serde_json::Value;

fn flat(v: &Value, out: &mut Vec<f64>, shape: &mut Vec<usize>, depth: usize) {
    match v {
        Value::Array(a) => {
            if shape.len() == depth {
                shape.push(a.len());
            }
            for x in a {
                flat(x, out, shape, depth + 1);
            }
        }
        Value::Number(n) => out.push(n.as_f64().unwrap()),
        _ => panic!("bad fixture"),
    }
}

fn tensor(v: &Value, dtype: DType) -> Tensor {
    let (mut data, mut shape) = (Vec::new(), Vec::new());
    flat(v, &mut data, &mut shape, 0);
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn eval(case: &Value, a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    let p: Vec<f64> = case["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    match case["loss"].as_str().unwrap() {
        "nt_xent" => NtXent::new(p[0])?.loss(a, b),
        "info_nce" => InfoNce::new(p[0])?.loss(a, b),
        "info_nce_queue" => {
            InfoNce::new(p[0])?.loss_with_negatives(a, b, Some(&tensor(&case["queue"], dtype)))
        }
        "cosine" => CosineSimilarity.loss(a, b),
        "negative_cosine" => NegativeCosine.loss(a, b),
        "barlow_twins" => BarlowTwins::new(p[0])?.loss(a, b),
        "vicreg" => Vicreg::new(p[0], p[1], p[2])?.loss(a, b),
        "supcon" => {
            let labels: Vec<u32> = case["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let n = labels.len();
            SupCon::new(p[0])?.loss(a, &Tensor::from_vec(labels, n, &Device::Cpu)?)
        }
        "margin" => {
            let same = tensor(&case["same"], dtype);
            ContrastiveMargin::new(p[0])?.loss(a, b, &same)
        }
        "triplet" => TripletMargin::new(p[0])?.loss(a, b, &tensor(&case["negative"], dtype)),
        other => panic!("unknown loss {other}"),
    }
}

/// `floor`: the smallest value used as the denominator of the relative error (f32 cannot resolve
/// losses near zero better than its epsilon times the size of the logits).
fn run(dtype: DType, tol: f64, floor: f64) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/losses.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut worst = (0.0f64, 0.0f64);
    let cases = doc["cases"].as_array().unwrap();
    for case in cases {
        let a = Var::from_tensor(&tensor(&case["a"], dtype)).unwrap();
        let b = tensor(&case["b"], dtype);
        let loss = eval(case, a.as_tensor(), &b, dtype).unwrap();
        assert!(loss.dims().is_empty(), "scalar output");
        let got = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let want = case["value"].as_f64().unwrap();
        let rel = (got - want).abs() / want.abs().max(floor);
        let what = format!("{} {:?} a{:?}", case["loss"], case["params"], a.dims());
        assert!(rel < tol, "{what}: value {got} vs {want} (rel {rel:e})");
        let g = loss.backward().unwrap();
        let ga = g
            .get(a.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let (mut want_g, mut shape) = (Vec::new(), Vec::new());
        flat(&case["grad_a"], &mut want_g, &mut shape, 0);
        let scale = want_g.iter().fold(0f64, |m, x| m.max(x.abs())).max(floor);
        let gd = ga
            .iter()
            .zip(&want_g)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(
            gd < tol,
            "{what}: gradient differs by {gd:e} relative to its max {scale:e}"
        );
        worst = (worst.0.max(rel), worst.1.max(gd));
    }
    eprintln!(
        "{:?}: {} cases, worst relative error: value {:e}, gradient {:e}",
        dtype,
        cases.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn values_and_gradients_match_pytorch_f64() {
    run(DType::F64, 1e-7, 1e-3);
}

#[test]
fn values_and_gradients_match_pytorch_f32() {
    run(DType::F32, 1e-5, 0.1);
}

#[test]
fn stable_at_low_temperature_and_large_norms() {
    let dev = Device::Cpu;
    let a = (Tensor::randn(0f32, 1., (64, 32), &dev).unwrap() * 1e4).unwrap();
    let b = (Tensor::randn(0f32, 1., (64, 32), &dev).unwrap() * 1e4).unwrap();
    let q = (Tensor::randn(0f32, 1., (256, 32), &dev).unwrap() * 1e4).unwrap();
    let av = Var::from_tensor(&a).unwrap();
    let losses = vec![
        NtXent::new(0.05).unwrap().loss(av.as_tensor(), &b).unwrap(),
        InfoNce::new(0.05)
            .unwrap()
            .loss(av.as_tensor(), &b)
            .unwrap(),
        InfoNce::new(0.05)
            .unwrap()
            .loss_with_negatives(av.as_tensor(), &b, Some(&q))
            .unwrap(),
        SupCon::new(0.05)
            .unwrap()
            .loss(
                &Tensor::stack(&[av.as_tensor(), &b], 1).unwrap(),
                &Tensor::zeros(64, DType::U32, &dev).unwrap(),
            )
            .unwrap(),
        BarlowTwins::new(5e-3)
            .unwrap()
            .loss(av.as_tensor(), &b)
            .unwrap(),
        Vicreg::new(25., 25., 1.)
            .unwrap()
            .loss(av.as_tensor(), &b)
            .unwrap(),
    ];
    for l in losses {
        let v = l.to_scalar::<f32>().unwrap();
        assert!(v.is_finite(), "loss {v}");
        let g = l.backward().unwrap();
        let gs: Vec<f32> = g
            .get(av.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gs.iter().all(|x| x.is_finite()));
    }
    // Identical views of orthogonal embeddings: NT-Xent at t = 0.05 is near its minimum, not NaN.
    let e = Tensor::eye(8, DType::F32, &dev).unwrap();
    let v = NtXent::new(0.05)
        .unwrap()
        .loss(&e, &e)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(v.is_finite() && v < 1e-3, "{v}");
}

#[test]
fn bad_input_is_an_error_naming_what_is_wrong() {
    let dev = Device::Cpu;
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = NtXent::new(t).unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
        assert!(InfoNce::new(t).is_err() && SupCon::new(t).is_err());
    }
    assert!(BarlowTwins::new(-1.0).is_err() && Vicreg::new(1.0, f64::NAN, 1.0).is_err());
    assert!(ContrastiveMargin::new(0.0).is_err() && TripletMargin::new(f64::NAN).is_err());
    let (x, y) = (
        Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
        Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
    );
    let e = ContrastiveMargin::new(1.0)
        .unwrap()
        .loss(&x, &y, &Tensor::zeros(5, DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("same"), "{e}");
    assert!(TripletMargin::new(1.0)
        .unwrap()
        .loss(&x, &y, &Tensor::zeros((4, 2), DType::F32, &dev).unwrap())
        .is_err());
    let one = Tensor::randn(0f32, 1., (1, 8), &dev).unwrap();
    let e = NtXent::new(0.5)
        .unwrap()
        .loss(&one, &one)
        .unwrap_err()
        .to_string();
    assert!(e.contains("N = 1"), "{e}");
    let a = Tensor::randn(0f32, 1., (4, 8), &dev).unwrap();
    let b = Tensor::randn(0f32, 1., (4, 6), &dev).unwrap();
    for l in [
        &NtXent::new(0.5).unwrap() as &dyn PairLoss,
        &CosineSimilarity,
        &NegativeCosine,
        &BarlowTwins::new(0.1).unwrap(),
        &Vicreg::new(1., 1., 1.).unwrap(),
    ] {
        let e = l.loss(&a, &b).unwrap_err().to_string();
        assert!(e.contains("[4, 8]") && e.contains("[4, 6]"), "{e}");
    }
    let b64 = a.to_dtype(DType::F64).unwrap();
    assert!(NtXent::new(0.5)
        .unwrap()
        .loss(&a, &b64)
        .unwrap_err()
        .to_string()
        .contains("dtype"));
    let queue = Tensor::randn(0f32, 1., (10, 5), &dev).unwrap();
    assert!(InfoNce::new(0.2)
        .unwrap()
        .loss_with_negatives(&a, &a, Some(&queue))
        .unwrap_err()
        .to_string()
        .contains("queue"));
    let f = Tensor::randn(0f32, 1., (4, 2, 8), &dev).unwrap();
    let e = SupCon::new(0.1)
        .unwrap()
        .loss(&f, &Tensor::zeros(3, DType::U32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels"), "{e}");
    let ints = Tensor::zeros((4, 8), DType::U32, &dev).unwrap();
    assert!(CosineSimilarity.loss(&ints, &ints).is_err());
}

/// The README's count of reference cases is the fixture's.
#[test]
fn the_readme_counts_the_fixture_cases() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/losses.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let n = doc["cases"].as_array().unwrap().len();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        readme.contains(&format!("| losses vs lightly/PyTorch, {n} cases |")),
        "README.md must say {n} loss cases"
    );
}

#[test]
fn vicreg_multi_crop_equals_the_pairwise_definition() {
    // VICReg computes each view's variance and covariance once; the value and the gradients
    // must equal the pair-by-pair definition of `PairLoss::multi_crop_loss`.
    let dev = Device::Cpu;
    let v = |seed: f64| {
        let t = Tensor::randn(seed, 1.0, (12, 6), &dev).unwrap();
        Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap()
    };
    let (g0, g1) = (v(0.0), v(0.5));
    let locals: Vec<Var> = (0..3).map(|i| v(i as f64)).collect();
    let lt: Vec<Tensor> = locals.iter().map(|l| l.as_tensor().clone()).collect();
    let loss = Vicreg::new(25.0, 25.0, 1.0).unwrap();
    let fast = loss.multi_crop_loss(&g0, &g1, &lt).unwrap();
    let slow = pairwise_multi_crop_loss(&loss, &g0, &g1, &lt).unwrap();
    let (f, s) = (
        fast.to_scalar::<f64>().unwrap(),
        slow.to_scalar::<f64>().unwrap(),
    );
    assert!((f - s).abs() < 1e-10 * s.abs().max(1.0), "{f} vs {s}");
    let (gf, gs) = (fast.backward().unwrap(), slow.backward().unwrap());
    for x in [&g0, &g1].into_iter().chain(locals.iter()) {
        let a: Vec<f64> = gf.get(x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = gs.get(x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-10, "gradient {p} vs {q}");
        }
    }
    // No local views: the loss of the pair.
    let pair = loss.loss(&g0, &g1).unwrap().to_scalar::<f64>().unwrap();
    let none = loss.multi_crop_loss(&g0, &g1, &[]).unwrap();
    assert_eq!(none.to_scalar::<f64>().unwrap(), pair);
    // The weighting: global pair twice, each (global, local) pair once.
    let nt = NtXent::new(0.5).unwrap();
    let by_hand = (2.0 * nt.loss(&g0, &g1).unwrap().to_scalar::<f64>().unwrap()
        + lt.iter()
            .flat_map(|l| [&g0, &g1].map(|g| nt.loss(g, l).unwrap().to_scalar::<f64>().unwrap()))
            .sum::<f64>())
        / 8.0;
    let got = nt
        .multi_crop_loss(&g0, &g1, &lt)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - by_hand).abs() < 1e-12, "{got} vs {by_hand}");
}
