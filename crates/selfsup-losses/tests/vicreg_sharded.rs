//! `Vicreg::sharded_loss` against `Vicreg::loss` (itself checked against lightly on fixtures in
//! `losses.rs`): the value and both gradients in one process, and two ranks (threads summing
//! through a shared buffer) against one process holding both ranks' rows.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use selfsup_losses::{PairLoss, Ranks, Vicreg};

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
    let d = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    d / scale
}

/// Embeddings with per-dimension offsets, spreads on both sides of 1 (so that the variance
/// hinge is active on some dimensions only) and correlated dimensions (a non-trivial
/// covariance term).
fn embeddings(n: usize, d: usize) -> Tensor {
    let dev = Device::Cpu;
    let base = Tensor::randn(0f32, 1., (n, d), &dev).unwrap();
    let mix = Tensor::randn(0f32, 0.3, (d, d), &dev).unwrap();
    let spread: Vec<f32> = (0..d).map(|j| 0.3 + 1.5 * (j % 5) as f32 / 4.0).collect();
    let spread = Tensor::from_vec(spread, (1, d), &dev).unwrap();
    let offset = Tensor::randn(0f32, 2., (1, d), &dev).unwrap();
    base.matmul(&mix)
        .unwrap()
        .add(&base)
        .unwrap()
        .broadcast_mul(&spread)
        .unwrap()
        .broadcast_add(&offset)
        .unwrap()
}

#[test]
fn sharded_vicreg_equals_vicreg_in_one_process() {
    let mut cases = 0;
    for &(n, d) in &[(8, 4), (32, 16), (64, 40), (3, 7)] {
        for weights in [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)] {
            let what = format!("n{n} d{d} weights {weights:?}");
            let loss = Vicreg::new(weights.0, weights.1, weights.2).unwrap();
            let a = Var::from_tensor(&embeddings(n, d)).unwrap();
            let b = Var::from_tensor(
                &(a.as_tensor() + Tensor::randn(0f32, 0.5, (n, d), &Device::Cpu).unwrap()).unwrap(),
            )
            .unwrap();
            let ours = loss
                .sharded_loss(a.as_tensor(), b.as_tensor(), None)
                .unwrap();
            let theirs = loss.loss(a.as_tensor(), b.as_tensor()).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{what}");
            let rel = max_rel(&ours, &theirs);
            assert!(rel < 1e-5, "{what}: value {ours} against {theirs}");
            let (g1, g2) = (ours.backward().unwrap(), theirs.backward().unwrap());
            for (v, name) in [(&a, "a"), (&b, "b")] {
                let (x, y) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let rel = max_rel(x, y);
                assert!(rel < 1e-4, "{what}: d{name} differs by {rel}");
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 8);
}

/// A sum over `world` threads: everyone adds into a shared buffer, then reads it back.
fn thread_ranks(world: usize) -> Vec<Ranks> {
    let barrier = Arc::new(Barrier::new(world));
    let acc = Arc::new(Mutex::new(Vec::<f32>::new()));
    (0..world)
        .map(|rank| {
            let (barrier, acc) = (barrier.clone(), acc.clone());
            Ranks::new(
                world,
                Arc::new(move |b: &mut [f32]| {
                    {
                        let mut acc = acc.lock().unwrap();
                        if acc.is_empty() {
                            acc.resize(b.len(), 0.0);
                        }
                        for (s, v) in acc.iter_mut().zip(b.iter()) {
                            *s += v;
                        }
                    }
                    barrier.wait();
                    b.copy_from_slice(&acc.lock().unwrap());
                    barrier.wait();
                    if rank == 0 {
                        acc.lock().unwrap().clear();
                    }
                    barrier.wait();
                    Ok(())
                }),
            )
        })
        .collect()
}

#[test]
fn two_ranks_equal_one_process() {
    let (n, d, world) = (24, 12, 2);
    let loss = Vicreg::new(25.0, 25.0, 1.0).unwrap();
    let a = Var::from_tensor(&embeddings(n, d)).unwrap();
    let noise = Tensor::randn(0f32, 0.5, (n, d), &Device::Cpu).unwrap();
    let b = Var::from_tensor(&(a.as_tensor() + noise).unwrap()).unwrap();
    let whole = loss
        .sharded_loss(a.as_tensor(), b.as_tensor(), None)
        .unwrap();
    let g = whole.backward().unwrap();
    let (da, db) = (g.get(a.as_tensor()).unwrap(), g.get(b.as_tensor()).unwrap());
    let per = n / world;
    let results: Vec<_> = thread_ranks(world)
        .into_iter()
        .enumerate()
        .map(|(r, ranks)| {
            let a = Var::from_tensor(&a.as_tensor().narrow(0, r * per, per).unwrap()).unwrap();
            let b = Var::from_tensor(&b.as_tensor().narrow(0, r * per, per).unwrap()).unwrap();
            std::thread::spawn(move || {
                let l = loss
                    .sharded_loss(a.as_tensor(), b.as_tensor(), Some(&ranks))
                    .unwrap();
                let g = l.backward().unwrap();
                let (da, db) = (g.get(a.as_tensor()).unwrap(), g.get(b.as_tensor()).unwrap());
                (l, da.clone(), db.clone())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for (r, (l, ra, rb)) in results.iter().enumerate() {
        assert!(
            max_rel(l, &whole) < 1e-5,
            "rank {r}: loss {l} against {whole}"
        );
        // Each rank holds world x dL/d(its rows) (the collectives' convention).
        for (mine, all, name) in [(ra, da, "a"), (rb, db, "b")] {
            let want = (all.narrow(0, r * per, per).unwrap() * world as f64).unwrap();
            let rel = max_rel(mine, &want);
            assert!(rel < 1e-4, "rank {r}: d{name} differs by {rel}");
        }
    }
}

#[test]
fn sharded_vicreg_rejects_bad_input() {
    let loss = Vicreg::new(25.0, 25.0, 1.0).unwrap();
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1., (4, 3), &dev).unwrap();
    assert!(loss.sharded_loss(&a, &a, None).is_ok());
    let b = Tensor::randn(0f32, 1., (4, 5), &dev).unwrap();
    assert!(loss.sharded_loss(&a, &b, None).is_err());
    let one = Tensor::randn(0f32, 1., (1, 3), &dev).unwrap();
    let e = loss.sharded_loss(&one, &one, None).unwrap_err().to_string();
    assert!(e.contains("at least 2"), "{e}");
    let a64 = a.to_dtype(DType::F64).unwrap();
    assert!(loss.sharded_loss(&a64, &a64, None).is_err());
}
