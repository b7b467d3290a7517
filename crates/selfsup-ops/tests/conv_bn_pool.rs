//! `conv2d_batch_norm_relu_max_pool2d` is our `conv2d` followed by our
//! `batch_norm_relu_max_pool2d` (each checked against candle and direct loops in `conv.rs` and
//! `bn_pool.rs`) as one graph node: its values, batch statistics and every gradient equal those
//! of the two ops bit for bit; and its errors.

use candle_core::{DType, Device, Tensor, Var};

mod common;
use common::backward_of;

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn conv_bn_relu_max_pool_equals_the_two_ops_exactly() {
    let dev = Device::Cpu;
    let one_rank = selfsup_ops::BnSync::new(0, 1, std::sync::Arc::new(|_: &mut [f64]| Ok(())));
    let mut cases = 0;
    for sync in [None, Some(&one_rank)] {
        // (n, c, h, w, o, conv k / stride / pad, pool k / stride / pad): small-cnn's first and a
        // middle layer at 24 px, an ImageNet-like stem, odd sizes.
        for &(n, c, h, wd, o, (ck, cs, cp), (k, stride, pad)) in &[
            (4, 3, 24, 24, 8, (3, 1, 1), (2, 2, 0)),
            (3, 16, 12, 12, 32, (3, 1, 1), (2, 2, 0)),
            (2, 3, 20, 20, 8, (7, 2, 3), (3, 2, 1)),
            (3, 5, 9, 7, 6, (3, 1, 1), (2, 2, 0)),
        ] {
            // The image batch (no gradient, the convolution skips dx) and a hidden layer's input.
            for x_tracked in [false, true] {
                let what = format!(
                    "n{n} c{c} {h}x{wd} o{o} conv {ck}/{cs}/{cp} pool {k}/{stride}/{pad} sync {} x tracked {x_tracked}",
                    sync.is_some()
                );
                let x0 = Tensor::randn(0f32, 1., (n, c, h, wd), &dev).unwrap();
                let xv = Var::from_tensor(&x0).unwrap();
                let x = if x_tracked {
                    xv.as_tensor().clone()
                } else {
                    x0
                };
                let std = (2.0 / (c * ck * ck) as f32).sqrt();
                let cw = Var::from_tensor(&Tensor::randn(0f32, std, (o, c, ck, ck), &dev).unwrap())
                    .unwrap();
                let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, o, &dev).unwrap()).unwrap();
                let b = Var::from_tensor(&Tensor::randn(0.2f32, 0.5, o, &dev).unwrap()).unwrap();
                let (cw_, w_, b_) = (cw.as_tensor(), w.as_tensor(), b.as_tensor());
                let fused = selfsup_ops::conv2d_batch_norm_relu_max_pool2d(
                    &x, cw_, cs, cp, w_, b_, 1e-5, k, stride, pad, sync,
                )
                .unwrap();
                let z = selfsup_ops::conv2d(&x, cw_, cs, cp).unwrap();
                let two =
                    selfsup_ops::batch_norm_relu_max_pool2d(&z, w_, b_, 1e-5, k, stride, pad, sync)
                        .unwrap();
                assert_eq!(fused.y.dims(), two.y.dims(), "{what}");
                assert_eq!(bits(&fused.y), bits(&two.y), "{what}: forward");
                assert_eq!(bits(&fused.mean), bits(&two.mean), "{what}: mean");
                assert_eq!(bits(&fused.var), bits(&two.var), "{what}: var");
                let r = Tensor::randn(0f32, 1., two.y.shape(), &dev).unwrap();
                let (g1, g2) = (backward_of(&fused.y, &r), backward_of(&two.y, &r));
                for (v, name) in [(&cw, "conv weight"), (&w, "weight"), (&b, "bias")] {
                    let (a, e) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                    assert_eq!(bits(a.unwrap()), bits(e.unwrap()), "{what}: d{name}");
                }
                let (a, e) = (g1.get(xv.as_tensor()), g2.get(xv.as_tensor()));
                if x_tracked {
                    assert_eq!(bits(a.unwrap()), bits(e.unwrap()), "{what}: dx");
                } else {
                    assert!(
                        a.is_none() && e.is_none(),
                        "{what}: dx of an untracked input"
                    );
                }
                // The gradient reaches dx through the pool, the ReLU and BatchNorm: not all zero.
                if x_tracked {
                    let s = g1
                        .get(xv.as_tensor())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    assert!(s.to_scalar::<f32>().unwrap() > 0.0, "{what}: dx is zero");
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 16);
}

#[test]
fn conv_bn_relu_max_pool_rejects_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev).unwrap();
    let cw = Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let f = selfsup_ops::conv2d_batch_norm_relu_max_pool2d;
    assert!(f(&x, &cw, 1, 1, &w, &b, 1e-5, 2, 2, 0, None).is_ok());
    // BatchNorm over another channel count than the convolution's output.
    let w3 = Tensor::ones(3, DType::F32, &dev).unwrap();
    assert!(f(&x, &cw, 1, 1, &w3, &w3, 1e-5, 2, 2, 0, None).is_err());
    // Input channels that the convolution does not expect.
    let x5 = Tensor::randn(0f32, 1., (2, 5, 8, 8), &dev).unwrap();
    assert!(f(&x5, &cw, 1, 1, &w, &b, 1e-5, 2, 2, 0, None).is_err());
    // A kernel larger than the padded input, a zero stride, a pool window larger than the
    // convolution's output, padding over half the pool window.
    let big = Tensor::randn(0f32, 0.3, (4, 3, 11, 11), &dev).unwrap();
    assert!(f(&x, &big, 1, 1, &w, &b, 1e-5, 2, 2, 0, None).is_err());
    assert!(f(&x, &cw, 0, 1, &w, &b, 1e-5, 2, 2, 0, None).is_err());
    assert!(f(&x, &cw, 1, 1, &w, &b, 1e-5, 9, 1, 0, None).is_err());
    assert!(f(&x, &cw, 1, 1, &w, &b, 1e-5, 2, 2, 2, None).is_err());
    // f64: the op is f32 only.
    let d = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    assert!(f(&d(&x), &d(&cw), 1, 1, &d(&w), &d(&b), 1e-5, 2, 2, 0, None).is_err());
}
