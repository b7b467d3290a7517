//! Synchronised BatchNorm: two ranks (threads over `selfsup_dist::LocalGroup`) with half a batch
//! each give the output, the input gradients and the running statistics of one BatchNorm over
//! the whole batch, on the fused CPU path (f32) and the composed path (f64); the weight and
//! bias gradients of the ranks add up to the whole batch's.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use selfsup_dist::{Comm, Communicator, LocalGroup};
use selfsup_models::layers::{batch_norm, sync_batch_norm_scope};
use selfsup_models::seeded_var_builder;

struct Out {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
    running: Vec<f64>,
}

fn v(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// BatchNorm (+ ReLU) of `x` in train mode, loss `sum(y * m)`, on `comm` (or alone).
fn step(x: &Tensor, m: &Tensor, dtype: DType, comm: Option<Comm>) -> Out {
    let vm = VarMap::new();
    let bn = {
        let _s = sync_batch_norm_scope(comm);
        batch_norm(4, seeded_var_builder(&vm, 1, dtype, &Device::Cpu)).unwrap()
    };
    // Non-trivial affine parameters.
    let w = Tensor::new(&[1.5f64, 0.5, -1.0, 2.0], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0], &Device::Cpu).unwrap();
    for (name, t) in [("weight", w), ("bias", b)] {
        vm.data().lock().unwrap()[name]
            .set(&t.to_dtype(dtype).unwrap())
            .unwrap();
    }
    let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
    let y = bn.forward_act(x.as_tensor(), true, true).unwrap();
    let loss = (&y * m.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let grad = |t: &Tensor| v(g.get(t).unwrap());
    Out {
        y: v(&y),
        dx: grad(x.as_tensor()),
        dw: grad(bn.weight.as_ref().unwrap()),
        db: grad(bn.bias.as_ref().unwrap()),
        running: [
            v(bn.running_mean.as_tensor()),
            v(bn.running_var.as_tensor()),
        ]
        .concat(),
    }
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y}");
    }
}

fn check(dtype: DType, tol: f64) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0.5f64, 2., (6, 4, 3, 3), &dev).unwrap();
    let m = Tensor::randn(0f64, 1., (6, 4, 3, 3), &dev).unwrap();
    let whole = step(&x, &m, dtype, None);
    let group = LocalGroup::new(2).unwrap();
    let parts: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                let r = g.rank();
                let (x, m) = (
                    x.narrow(0, 3 * r, 3).unwrap(),
                    m.narrow(0, 3 * r, 3).unwrap(),
                );
                s.spawn(move || step(&x, &m, dtype, Some(Arc::new(g) as Comm)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cat = |f: fn(&Out) -> &Vec<f64>| -> Vec<f64> {
        parts.iter().flat_map(|p| f(p).clone()).collect()
    };
    close(&whole.y, &cat(|o| &o.y), tol, "y");
    close(&whole.dx, &cat(|o| &o.dx), tol, "dx");
    let sum = |f: fn(&Out) -> &Vec<f64>| -> Vec<f64> {
        (0..4)
            .map(|i| parts.iter().map(|p| f(p)[i]).sum())
            .collect()
    };
    close(&whole.dw, &sum(|o| &o.dw), tol, "dw (sum over ranks)");
    close(&whole.db, &sum(|o| &o.db), tol, "db (sum over ranks)");
    for p in &parts {
        close(&whole.running, &p.running, tol, "running statistics");
    }
    // Per-rank BatchNorm would not match (the check above can fail).
    let alone = step(
        &x.narrow(0, 0, 3).unwrap(),
        &m.narrow(0, 0, 3).unwrap(),
        dtype,
        None,
    );
    let differs = whole.y[..alone.y.len()]
        .iter()
        .zip(&alone.y)
        .any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(differs);
}

#[test]
fn sync_batch_norm_on_two_ranks_equals_one_batch_fused_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn sync_batch_norm_on_two_ranks_equals_one_batch_composed_f64() {
    check(DType::F64, 1e-12);
}
