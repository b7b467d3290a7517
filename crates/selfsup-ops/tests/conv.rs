//! The im2col convolution agrees with candle's conv2d, values and gradients, over many shapes.

use candle_core::{DType, Device, Tensor, Var};

mod common;
use common::max_rel;

#[test]
fn conv2d_matches_candle_values_and_gradients() {
    let dev = Device::Cpu;
    let mut cases = 0;
    for &(n, c, o, h, w) in &[
        (1, 3, 8, 9, 9),
        (3, 3, 16, 12, 10),
        (2, 64, 32, 8, 8),
        (3, 16, 24, 7, 9),
        (5, 7, 5, 11, 13),
        // Maps as small as small-cnn's last ones (smaller ones: im2col_matches_its_definition_exactly;
        // candle's own gradient fails on some of them).
        (3, 4, 6, 3, 3),
        (2, 3, 4, 2, 4),
    ] {
        for k in [1usize, 3, 5, 7] {
            for stride in [1usize, 2] {
                for pad in [0usize, 1, 3] {
                    if h + 2 * pad < k || w + 2 * pad < k {
                        continue;
                    }
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap())
                        .unwrap();
                    let wt =
                        Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap())
                            .unwrap();
                    let ours =
                        selfsup_ops::conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
                    let theirs = x
                        .as_tensor()
                        .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                        .unwrap();
                    assert_eq!(ours.dims(), theirs.dims());
                    let what = format!("n{n} c{c} o{o} {h}x{w} k{k} s{stride} p{pad}");
                    assert!(max_rel(&ours, &theirs) < 1e-4, "{what}: forward");
                    // Gradients of a weighted sum (so every output position matters differently).
                    let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
                    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (theirs * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    for (v, name) in [(&x, "input"), (&wt, "weight")] {
                        let a = g1.get(v.as_tensor()).unwrap();
                        let b = g2.get(v.as_tensor()).unwrap();
                        assert!(
                            max_rel(a, b) < 1e-4,
                            "{what}: {name} gradient differs by {}",
                            max_rel(a, b)
                        );
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 60, "{cases}");
}

#[test]
fn f64_and_errors() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1., (2, 3, 6, 6), &dev).unwrap();
    let w = Tensor::randn(0f64, 1., (4, 3, 3, 3), &dev).unwrap();
    let a = selfsup_ops::conv2d(&x, &w, 1, 1).unwrap();
    let b = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    assert!(max_rel(&a, &b) < 1e-12);
    let bad = Tensor::randn(0f32, 1., (4, 2, 3, 3), &dev).unwrap();
    assert!(selfsup_ops::conv2d(&x.to_dtype(DType::F32).unwrap(), &bad, 1, 1).is_err());
    assert!(selfsup_ops::im2col(&x, 9, 1, 0).is_err());
}

/// An input that needs no gradient (the image batch) gets none, and the weight gradient is
/// still right; batches that do not divide into the op's sample chunks work too.
#[test]
fn constant_input_and_uneven_chunks() {
    let dev = Device::Cpu;
    for &(n, c, o, h, k, stride, pad) in &[
        (37usize, 3usize, 8usize, 4usize, 3usize, 1usize, 1usize),
        (19, 5, 4, 8, 3, 2, 1),
        (3, 2, 6, 32, 5, 1, 2),
    ] {
        let x = Tensor::randn(0f32, 1., (n, c, h, h), &dev).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap()).unwrap();
        let ours = selfsup_ops::conv2d(&x, wt.as_tensor(), stride, pad).unwrap();
        let theirs = x.conv2d(wt.as_tensor(), pad, stride, 1, 1).unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-4);
        let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g1.get(&x).is_none());
        let (a, b) = (
            g1.get(wt.as_tensor()).unwrap(),
            g2.get(wt.as_tensor()).unwrap(),
        );
        assert!(
            max_rel(a, b) < 1e-4,
            "n{n} weight gradient: {}",
            max_rel(a, b)
        );
    }
}

/// `conv2d_fast_forward`: 3x3 / stride 1 / padding 1 with at least 16 channels in and out takes
/// the Winograd forward: odd and tiny sizes (partial tiles), several chunks, values and
/// gradients against candle; other shapes fall back to the im2col forward.
#[test]
fn winograd_forward_matches_candle() {
    let dev = Device::Cpu;
    for &(n, c, o, h, w) in &[
        (3, 16, 16, 7, 9),
        (1, 64, 128, 4, 4),
        (2, 32, 20, 1, 1),
        (5, 17, 33, 5, 3),
        (40, 16, 16, 4, 4),
        (2, 64, 64, 32, 32),
        (2, 3, 16, 8, 8),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev).unwrap()).unwrap();
        let ours = selfsup_ops::conv2d_fast_forward(x.as_tensor(), wt.as_tensor(), 1, 1).unwrap();
        let theirs = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap();
        let what = format!("n{n} c{c} o{o} {h}x{w}");
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        let d = max_rel(&ours, &theirs);
        assert!(d < 1e-5, "{what}: forward differs by {d}");
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev).unwrap();
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &wt] {
            let d = max_rel(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{what}: gradient differs by {d}");
        }
    }
}

/// The column matrix, entry by entry from its definition: row `(c, ky, kx)`, column
/// `(n, oy, ox)` holds `x[n, c, oy s + ky - p, ox s + kx - p]`, 0 outside; bit for bit, over
/// every small map, kernel, stride and padding (the "same" convolutions take their own path);
/// `col2im` likewise against the scatter-add that defines it.
#[test]
fn im2col_matches_its_definition_exactly() {
    let dev = Device::Cpu;
    let mut same = 0;
    for (n, c) in [(1usize, 1usize), (2, 3)] {
        for h in 1..=6usize {
            for w in 1..=6usize {
                for k in [1usize, 2, 3, 5, 7] {
                    for stride in [1usize, 2] {
                        for pad in 0..=3usize {
                            if h + 2 * pad < k || w + 2 * pad < k {
                                continue;
                            }
                            let x = Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap();
                            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                            let cols: Vec<Vec<f32>> = selfsup_ops::im2col(&x, k, stride, pad)
                                .unwrap()
                                .to_vec2()
                                .unwrap();
                            let oh = (h + 2 * pad - k) / stride + 1;
                            let ow = (w + 2 * pad - k) / stride + 1;
                            same += usize::from(stride == 1 && oh == h && ow == w);
                            assert_eq!((cols.len(), cols[0].len()), (c * k * k, n * oh * ow));
                            for ci in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let row = &cols[(ci * k + ky) * k + kx];
                                        for ni in 0..n {
                                            for oy in 0..oh {
                                                for ox in 0..ow {
                                                    let iy =
                                                        (oy * stride + ky) as isize - pad as isize;
                                                    let ix =
                                                        (ox * stride + kx) as isize - pad as isize;
                                                    let want = if iy >= 0
                                                        && ix >= 0
                                                        && (iy as usize) < h
                                                        && (ix as usize) < w
                                                    {
                                                        xs[((ni * c + ci) * h + iy as usize) * w
                                                            + ix as usize]
                                                    } else {
                                                        0.0
                                                    };
                                                    let got = row[(ni * oh + oy) * ow + ox];
                                                    assert_eq!(
                                                        got.to_bits(),
                                                        want.to_bits(),
                                                        "n{n} c{c} {h}x{w} k{k} s{stride} p{pad}: \
                                                         ({ci},{ky},{kx}) at ({ni},{oy},{ox})"
                                                    );
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                            // col2im, its adjoint: each column value added into the input
                            // position it was read from, in (ky, kx) order.
                            let g = selfsup_ops::Geometry {
                                n,
                                c,
                                h,
                                w,
                                k,
                                stride,
                                pad,
                            };
                            let dcols =
                                Tensor::randn(0f32, 1., (c * k * k, n * oh * ow), &dev).unwrap();
                            let dc: Vec<Vec<f32>> = dcols.to_vec2().unwrap();
                            let got: Vec<f32> = selfsup_ops::col2im(&dcols, g)
                                .unwrap()
                                .flatten_all()
                                .unwrap()
                                .to_vec1()
                                .unwrap();
                            let mut want = vec![0f32; n * c * h * w];
                            for ni in 0..n {
                                for ci in 0..c {
                                    for ky in 0..k {
                                        for kx in 0..k {
                                            for oy in 0..oh {
                                                for ox in 0..ow {
                                                    let iy =
                                                        (oy * stride + ky) as isize - pad as isize;
                                                    let ix =
                                                        (ox * stride + kx) as isize - pad as isize;
                                                    if iy >= 0
                                                        && ix >= 0
                                                        && (iy as usize) < h
                                                        && (ix as usize) < w
                                                    {
                                                        want[((ni * c + ci) * h + iy as usize)
                                                            * w
                                                            + ix as usize] += dc
                                                            [(ci * k + ky) * k + kx]
                                                            [(ni * oh + oy) * ow + ox];
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "col2im n{n} c{c} {h}x{w} k{k} s{stride} p{pad}"
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(same > 50, "only {same} same-size cases");
}
