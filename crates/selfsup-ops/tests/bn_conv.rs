//! `batch_norm_relu_conv2d` agrees with candle's own ops composed (BatchNorm from primitive
//! ops, `relu`, candle's `conv2d`): values, gradients of all four inputs and the batch
//! statistics, over many shapes; and its errors.

use candle_core::{DType, Device, Tensor, Var};

mod common;
use common::{bn_relu_train, max_rel};

/// Training-mode BatchNorm + ReLU + convolution from candle's primitive ops; also returns the
/// batch mean and biased variance.
fn reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    cw: &Tensor,
    stride: usize,
    pad: usize,
) -> (Tensor, Tensor, Tensor) {
    let [h, mean, var] = bn_relu_train(x, w, b);
    (h.conv2d(cw, pad, stride, 1, 1).unwrap(), mean, var)
}

#[test]
fn bn_relu_conv_matches_candle_ops() {
    let dev = Device::Cpu;
    let mut cases = 0;
    for &(n, c, o, h, wd) in &[
        (1, 3, 8, 9, 9),
        (3, 5, 6, 9, 7),
        (2, 64, 16, 8, 8),
        (5, 3, 7, 11, 11),
    ] {
        for (k, stride, pad) in [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 0), (7, 1, 3)] {
            if h + 2 * pad < k || wd + 2 * pad < k {
                continue;
            }
            let what = format!("n{n} c{c} o{o} {h}x{wd} k{k} s{stride} p{pad}");
            // An offset mean, so that the ReLU cuts in different places per channel.
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., (n, c, h, wd), &dev).unwrap() + 1.0).unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let cw =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap()).unwrap();
            let (x_, w_, b_, cw_) = (x.as_tensor(), w.as_tensor(), b.as_tensor(), cw.as_tensor());
            let ours =
                selfsup_ops::batch_norm_relu_conv2d(x_, w_, b_, 1e-5, cw_, stride, pad, None)
                    .unwrap();
            let (theirs, mean, var) = reference(x_, w_, b_, cw_, stride, pad);
            assert_eq!(ours.y.dims(), theirs.dims(), "{what}");
            assert!(max_rel(&ours.y, &theirs) < 1e-4, "{what}: forward");
            assert!(max_rel(&ours.mean, &mean) < 1e-5, "{what}: mean");
            assert!(max_rel(&ours.var, &var) < 1e-5, "{what}: var");
            let r = Tensor::randn(0f32, 1., theirs.shape(), &dev).unwrap();
            let g1 = (&ours.y * &r).unwrap().sum_all().unwrap();
            let g1 = g1.backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap();
            let g2 = g2.backward().unwrap();
            for (v, name) in [
                (&x, "x"),
                (&w, "weight"),
                (&b, "bias"),
                (&cw, "conv weight"),
            ] {
                let d = max_rel(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "{what}: d{name} differs by {d}");
            }
            cases += 1;
        }
    }
    assert!(cases >= 18, "only {cases} shapes ran");
}

#[test]
fn bn_relu_conv_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 4, 6, 6), &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let ok = Tensor::randn(0f32, 1., (3, 4, 3, 3), &dev).unwrap();
    assert!(selfsup_ops::batch_norm_relu_conv2d(&x, &w, &b, 1e-5, &ok, 1, 1, None).is_ok());
    // Conv weight expects 5 input channels.
    let bad = Tensor::randn(0f32, 1., (3, 5, 3, 3), &dev).unwrap();
    assert!(selfsup_ops::batch_norm_relu_conv2d(&x, &w, &b, 1e-5, &bad, 1, 1, None).is_err());
    // BatchNorm parameters for 3 channels.
    let w3 = Tensor::ones(3, DType::F32, &dev).unwrap();
    assert!(selfsup_ops::batch_norm_relu_conv2d(&x, &w3, &w3, 1e-5, &ok, 1, 1, None).is_err());
    // A kernel larger than the padded input, a zero stride.
    let big = Tensor::randn(0f32, 1., (3, 4, 9, 9), &dev).unwrap();
    assert!(selfsup_ops::batch_norm_relu_conv2d(&x, &w, &b, 1e-5, &big, 1, 1, None).is_err());
    assert!(selfsup_ops::batch_norm_relu_conv2d(&x, &w, &b, 1e-5, &ok, 0, 1, None).is_err());
    // f64 input: the op is f32 only.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (w64, b64) = (
        w.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let ok64 = ok.to_dtype(DType::F64).unwrap();
    assert!(
        selfsup_ops::batch_norm_relu_conv2d(&x64, &w64, &b64, 1e-5, &ok64, 1, 1, None).is_err()
    );
}
