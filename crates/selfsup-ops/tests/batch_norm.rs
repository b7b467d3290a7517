//! The fused batch norm agrees with the same formula composed of candle ops, values and
//! gradients (input, weight, bias), for 4-D and 2-D inputs, with and without the fused ReLU.

use candle_core::{DType, Device, Tensor, Var};

fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
    let c = x.dim(1).unwrap();
    let n = (x.elem_count() / c) as f64;
    let mut shape = vec![1; x.rank()];
    shape[1] = c;
    let mean = (x.sum_keepdim(dims.as_slice()).unwrap() / n).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = (xc.sqr().unwrap().sum_keepdim(dims.as_slice()).unwrap() / n).unwrap();
    let y = xc
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    y.broadcast_mul(&w.reshape(shape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(shape.as_slice()).unwrap())
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / s.max(1e-3)
}

#[test]
fn fused_batch_norm_matches_composed_ops() {
    let dev = Device::Cpu;
    for (shape, relu) in [
        (vec![4usize, 3, 5, 7], false),
        (vec![4usize, 3, 5, 7], true),
        (vec![1, 8, 3, 3], false),
        (vec![1, 8, 3, 3], true),
        (vec![16, 32], false),
        (vec![16, 32], true),
        (vec![5, 64, 4, 4], true),
        (vec![2, 3, 32, 32], true),
    ] {
        let c = shape[1];
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2., shape.as_slice(), &dev).unwrap() + 3.0).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, c, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, c, &dev).unwrap()).unwrap();
        let out = selfsup_ops::batch_norm_train(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
            relu,
            None,
        )
        .unwrap();
        let ours = out.y.clone();
        let mut theirs = reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5);
        if relu {
            theirs = theirs.relu().unwrap();
            let negative = ours.lt(0f32).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(negative.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
        assert!(max_rel(&ours, &theirs) < 1e-4, "{shape:?} forward");
        let r = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias")] {
            let d = max_rel(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-3, "{shape:?}: d{name} differs by {d}");
        }
        let st = selfsup_ops::channel_stats(x.as_tensor()).unwrap();
        assert_eq!(st.dims(), &[2, c]);
        assert_eq!(st.dtype(), DType::F64);
        let dims: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
        let mean = x
            .as_tensor()
            .mean_keepdim(dims.as_slice())
            .unwrap()
            .flatten_all()
            .unwrap();
        let xc = x
            .as_tensor()
            .broadcast_sub(&x.as_tensor().mean_keepdim(dims.as_slice()).unwrap())
            .unwrap();
        let var = xc
            .sqr()
            .unwrap()
            .mean_keepdim(dims.as_slice())
            .unwrap()
            .flatten_all()
            .unwrap();
        let st32 = st.to_dtype(DType::F32).unwrap();
        assert!(max_rel(&st32.get(0).unwrap(), &mean) < 1e-5);
        assert!(max_rel(&out.mean, &mean) < 1e-5);
        assert!(max_rel(&out.var, &var) < 1e-5);
    }
    let ints = Tensor::zeros((2, 3, 4), DType::F64, &dev).unwrap();
    let w = Tensor::ones(3, DType::F64, &dev).unwrap();
    assert!(selfsup_ops::batch_norm_train(&ints, &w, &w, 1e-5, false, None).is_err());
}

/// The centred sums keep the gradients right when the mean dwarfs the spread.
#[test]
fn large_mean_small_spread() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(
        &(Tensor::randn(0f32, 0.01, (8, 4, 6, 6), &dev).unwrap() + 100.0).unwrap(),
    )
    .unwrap();
    let w = Var::from_tensor(&Tensor::ones(4, DType::F32, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap();
    let ours = selfsup_ops::batch_norm_train(
        x.as_tensor(),
        w.as_tensor(),
        b.as_tensor(),
        1e-5,
        false,
        None,
    )
    .unwrap()
    .y;
    let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
    let r = Tensor::randn(0f32, 1., (8, 4, 6, 6), &dev).unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let r64 = r.to_dtype(DType::F64).unwrap();
    let x64v = Var::from_tensor(&x64).unwrap();
    let theirs = reference(
        x64v.as_tensor(),
        &w.as_tensor().to_dtype(DType::F64).unwrap(),
        &b.as_tensor().to_dtype(DType::F64).unwrap(),
        1e-5,
    );
    let g2 = (theirs * &r64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let a = g1.get(x.as_tensor()).unwrap();
    let b = g2
        .get(x64v.as_tensor())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let d = max_rel(a, &b);
    assert!(d < 1e-3, "dx differs by {d}");
}

/// `relu(bn(x) + r)` as one op agrees with the composed ops, values and all four gradients.
#[test]
fn fused_bn_add_relu_matches_composed_ops() {
    let dev = Device::Cpu;
    for shape in [vec![4usize, 3, 5, 7], vec![2, 16, 8, 8], vec![1, 4, 3, 3]] {
        let c = shape[1];
        let x =
            Var::from_tensor(&Tensor::randn(1f32, 2., shape.as_slice(), &dev).unwrap()).unwrap();
        let r =
            Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, c, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, c, &dev).unwrap()).unwrap();
        let out = selfsup_ops::batch_norm_add_relu_train(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            r.as_tensor(),
            1e-5,
            None,
        )
        .unwrap();
        let theirs = (reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5) + r.as_tensor())
            .unwrap()
            .relu()
            .unwrap();
        assert!(max_rel(&out.y, &theirs) < 1e-4, "{shape:?} forward");
        let m = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
        let g1 = (out.y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [(&x, "x"), (&w, "weight"), (&b, "bias"), (&r, "residual")] {
            let d = max_rel(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-3, "{shape:?}: d{name} differs by {d}");
        }
    }
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(3, DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
    assert!(selfsup_ops::batch_norm_add_relu_train(&x, &w, &w, &wrong, 1e-5, None).is_err());
}

#[test]
fn fused_bn_add_bn_relu_matches_composed_ops() {
    let dev = Device::Cpu;
    for shape in [vec![4usize, 3, 5, 7], vec![2, 16, 8, 8], vec![1, 4, 3, 3]] {
        let c = shape[1];
        let var = |mean: f32, std: f32, s: &[usize]| {
            Var::from_tensor(&Tensor::randn(mean, std, s, &dev).unwrap()).unwrap()
        };
        let (x, r) = (var(1., 2., &shape), var(-0.5, 1., &shape));
        let (w, b) = (var(1., 0.2, &[c]), var(0., 0.2, &[c]));
        let (rw, rb) = (var(1., 0.2, &[c]), var(0., 0.2, &[c]));
        let out = selfsup_ops::batch_norm_add_bn_relu_train(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            r.as_tensor(),
            rw.as_tensor(),
            rb.as_tensor(),
            1e-5,
            None,
        )
        .unwrap();
        let theirs = (reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
            + reference(r.as_tensor(), rw.as_tensor(), rb.as_tensor(), 1e-5))
        .unwrap()
        .relu()
        .unwrap();
        assert!(max_rel(&out.y, &theirs) < 1e-4, "{shape:?} forward");
        for (t, st) in [(&x, &out.x), (&r, &out.residual)] {
            let dims: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
            let mean = t.as_tensor().mean_keepdim(dims.as_slice()).unwrap();
            let v = t.as_tensor().broadcast_sub(&mean).unwrap().sqr().unwrap();
            let v = v
                .mean_keepdim(dims.as_slice())
                .unwrap()
                .flatten_all()
                .unwrap();
            assert!(max_rel(&st.mean, &mean.flatten_all().unwrap()) < 1e-5);
            assert!(max_rel(&st.var, &v) < 1e-5);
        }
        let m = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
        let g1 = (out.y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [
            (&x, "x"),
            (&w, "weight"),
            (&b, "bias"),
            (&r, "residual"),
            (&rw, "residual weight"),
            (&rb, "residual bias"),
        ] {
            let d = max_rel(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-3, "{shape:?}: d{name} differs by {d}");
        }
    }
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(3, DType::F32, &dev).unwrap();
    let w4 = Tensor::ones(4, DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
    let f = selfsup_ops::batch_norm_add_bn_relu_train;
    assert!(f(&x, &w, &w, &wrong, &w, &w, 1e-5, None).is_err());
    assert!(f(&x, &w, &w, &x, &w4, &w, 1e-5, None).is_err());
    assert!(f(&x, &w, &w, &x, &w, &w, 1e-5, None).is_ok());
}

#[test]
fn scale_shift_add_relu_matches_composed_ops() {
    let dev = Device::Cpu;
    for shape in [
        vec![4usize, 3, 5, 7],
        vec![2, 16, 8, 8],
        vec![1, 4, 3, 3],
        vec![6, 5],
    ] {
        let c = shape[1];
        let var = |mean: f32, std: f32, s: &[usize]| {
            Var::from_tensor(&Tensor::randn(mean, std, s, &dev).unwrap()).unwrap()
        };
        let (x, r) = (var(0.5, 1., &shape), var(-0.2, 1., &shape));
        let (s, b, rs, rb) = (
            var(1., 0.3, &[c]),
            var(0., 0.3, &[c]),
            var(1., 0.3, &[c]),
            var(0., 0.3, &[c]),
        );
        let t = |v: &Var| v.as_tensor().clone();
        let ours =
            selfsup_ops::scale_shift_add_relu(&t(&x), &t(&s), &t(&b), &t(&r), &t(&rs), &t(&rb))
                .unwrap();
        let mut pshape = vec![1; shape.len()];
        pshape[1] = c;
        let bc = |v: &Var| t(v).reshape(pshape.as_slice()).unwrap();
        let theirs = (t(&x)
            .broadcast_mul(&bc(&s))
            .unwrap()
            .broadcast_add(&bc(&b))
            .unwrap()
            + t(&r)
                .broadcast_mul(&bc(&rs))
                .unwrap()
                .broadcast_add(&bc(&rb))
                .unwrap())
        .unwrap()
        .relu()
        .unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-6, "{shape:?} forward");
        let m = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
        let g1 = (ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, name) in [
            (&x, "x"),
            (&r, "residual"),
            (&s, "scale"),
            (&b, "shift"),
            (&rs, "r_scale"),
            (&rb, "r_shift"),
        ] {
            let d = max_rel(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{shape:?}: d{name} differs by {d}");
        }
    }
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(3, DType::F32, &dev).unwrap();
    let wrong = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
    assert!(selfsup_ops::scale_shift_add_relu(&x, &w, &w, &wrong, &w, &w).is_err());
    assert!(selfsup_ops::scale_shift_add_relu(&x, &w, &w, &x, &w, &w).is_ok());
}
