//! `batch_norm_relu_max_pool2d` agrees with the same three layers as separate ops (BatchNorm
//! from candle's primitive ops, `relu`, our `max_pool2d`, itself checked against direct loops
//! and candle in `pool.rs`; candle's own max-pool gradient is wrong by 1/k^2): values,
//! gradients of all three inputs and the batch statistics, over many shapes; and its errors.

use candle_core::{DType, Device, Tensor, Var};

mod common;
use common::{backward_of, bn_relu_train, max_rel};

/// Training-mode BatchNorm + ReLU from candle's primitive ops, then our max pool; also the
/// batch mean and biased variance.
fn reference(x: &Tensor, w: &Tensor, b: &Tensor, k: usize, s: usize, p: usize) -> [Tensor; 3] {
    let [h, mean, var] = bn_relu_train(x, w, b);
    [selfsup_ops::max_pool2d(&h, k, s, p).unwrap(), mean, var]
}

#[test]
fn bn_relu_max_pool_matches_separate_ops() {
    let dev = Device::Cpu;
    let mut cases = 0;
    for &(n, c, h, wd) in &[(1, 3, 8, 8), (3, 5, 9, 7), (2, 64, 8, 8), (4, 32, 16, 16)] {
        for (k, stride, pad) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)] {
            let what = format!("n{n} c{c} {h}x{wd} k{k} s{stride} p{pad}");
            // An offset mean, so that the ReLU cuts in different places per channel.
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., (n, c, h, wd), &dev).unwrap() + 1.0).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let (x_, w_, b_) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours =
                selfsup_ops::batch_norm_relu_max_pool2d(x_, w_, b_, 1e-5, k, stride, pad, None)
                    .unwrap();
            let [theirs, mean, var] = reference(x_, w_, b_, k, stride, pad);
            assert_eq!(ours.y.dims(), theirs.dims(), "{what}");
            assert!(max_rel(&ours.y, &theirs) < 1e-5, "{what}: forward");
            assert!(max_rel(&ours.mean, &mean) < 1e-5, "{what}: mean");
            assert!(max_rel(&ours.var, &var) < 1e-5, "{what}: var");
            let r = Tensor::randn(0f32, 1., theirs.shape(), &dev).unwrap();
            let g1 = (&ours.y * &r).unwrap().sum_all().unwrap();
            let g1 = g1.backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap();
            let g2 = g2.backward().unwrap();
            for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                let d = max_rel(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "{what}: d{name} differs by {d}");
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 16);
}

#[test]
fn bn_relu_max_pool_rejects_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 4, 6, 6), &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let f = selfsup_ops::batch_norm_relu_max_pool2d;
    assert!(f(&x, &w, &b, 1e-5, 2, 2, 0, None).is_ok());
    let w3 = Tensor::ones(3, DType::F32, &dev).unwrap();
    assert!(f(&x, &w3, &w3, 1e-5, 2, 2, 0, None).is_err());
    // A window larger than the padded input, a zero stride, padding over half the window.
    assert!(f(&x, &w, &b, 1e-5, 9, 1, 1, None).is_err());
    assert!(f(&x, &w, &b, 1e-5, 2, 0, 0, None).is_err());
    assert!(f(&x, &w, &b, 1e-5, 2, 2, 2, None).is_err());
    // f64: the op is f32 only.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let w64 = w.to_dtype(DType::F64).unwrap();
    assert!(f(&x64, &w64, &w64, 1e-5, 2, 2, 0, None).is_err());
}

/// The fused op recomputes per plane what the separate ops store, with the same arithmetic:
/// its values and all three gradients equal, bit for bit, those of our own training-mode
/// BatchNorm(+ReLU) followed by our max pool, with and without synchronised statistics (one
/// rank, so that both take the synchronised path).
#[test]
fn bn_relu_max_pool_equals_our_separate_ops_exactly() {
    let dev = Device::Cpu;
    let one_rank = selfsup_ops::BnSync::new(0, 1, std::sync::Arc::new(|_: &mut [f64]| Ok(())));
    for sync in [None, Some(&one_rank)] {
        for &(n, c, h, wd, k, stride, pad) in &[
            (4, 8, 24, 24, 2, 2, 0),
            (3, 5, 9, 7, 2, 2, 0),
            (2, 6, 8, 8, 3, 2, 1),
            (2, 3, 5, 5, 3, 1, 1),
        ] {
            let what = format!(
                "n{n} c{c} {h}x{wd} k{k} s{stride} p{pad} sync {}",
                sync.is_some()
            );
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., (n, c, h, wd), &dev).unwrap() + 0.5).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let (x_, w_, b_) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let fused =
                selfsup_ops::batch_norm_relu_max_pool2d(x_, w_, b_, 1e-5, k, stride, pad, sync)
                    .unwrap();
            let bn = selfsup_ops::batch_norm_train(x_, w_, b_, 1e-5, true, sync).unwrap();
            let separate = selfsup_ops::max_pool2d(&bn.y, k, stride, pad).unwrap();
            let r = Tensor::randn(0f32, 1., separate.shape(), &dev).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(bits(&fused.y), bits(&separate), "{what}: forward");
            assert_eq!(bits(&fused.mean), bits(&bn.mean), "{what}: mean");
            assert_eq!(bits(&fused.var), bits(&bn.var), "{what}: var");
            let (g1, g2) = (backward_of(&fused.y, &r), backward_of(&separate, &r));
            for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
                let (a, b) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                assert_eq!(bits(a.unwrap()), bits(b.unwrap()), "{what}: d{name}");
            }
        }
    }
}
