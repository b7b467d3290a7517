//! The max pool agrees with candle's (kernel == stride) and with a direct loop (any window,
//! stride, padding), values and gradients; ties send the gradient to the first maximum. The global
//! average pool agrees with candle's two means, values and gradients.

use candle_core::{Device, Tensor, Var};

/// Direct loops: `(output, input gradient of sum(output * r))`.
fn reference(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
    s: usize,
    p: usize,
    r: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let oh = (h + 2 * p - k) / s + 1;
    let ow = (w + 2 * p - k) / s + 1;
    let mut y = vec![0f32; n * c * oh * ow];
    let mut dx = vec![0f32; x.len()];
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(usize, f32)> = None;
                for ky in 0..k {
                    for kx in 0..k {
                        let iy = (oy * s + ky) as isize - p as isize;
                        let ix = (ox * s + kx) as isize - p as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let i = plane * h * w + iy as usize * w + ix as usize;
                        if best.map_or(true, |(_, b)| x[i] > b) {
                            best = Some((i, x[i]));
                        }
                    }
                }
                let (i, v) = best.expect("window overlaps the input");
                let o = plane * oh * ow + oy * ow + ox;
                y[o] = v;
                dx[i] += r[o];
            }
        }
    }
    (y, dx)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn max_pool_matches_direct_loops_and_candle() {
    let dev = Device::Cpu;
    let mut cases = 0;
    for &(n, c, h, w) in &[(1, 3, 8, 8), (3, 5, 9, 7), (2, 64, 16, 16), (5, 1, 4, 4)] {
        for &(k, s, p) in &[
            (2, 2, 0),
            (3, 2, 1),
            (3, 1, 1),
            (2, 1, 0),
            (3, 3, 0),
            (5, 2, 2),
        ] {
            if h + 2 * p < k || w + 2 * p < k {
                continue;
            }
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
            let y = selfsup_ops::max_pool2d(x.as_tensor(), k, s, p).unwrap();
            let r = Tensor::randn(0f32, 1., y.dims(), &dev).unwrap();
            let xs = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rs = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (y_ref, dx_ref) = reference(&xs, (n, c, h, w), k, s, p, &rs);
            let what = format!("{n}x{c}x{h}x{w} k{k} s{s} p{p}");
            let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(max_abs_diff(&ys, &y_ref), 0.0, "{what}: forward");
            let g = (y.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            let dxs = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(max_abs_diff(&dxs, &dx_ref) < 1e-5, "{what}: gradient");
            if k == s && p == 0 && h % k == 0 && w % k == 0 {
                // candle's own op agrees on values. Its gradient (0.11) is the right one
                // divided by k * k: `backprop.rs` multiplies by the window's *average* of the
                // max mask (1 / k^2 for a single maximum) where it means to divide by the count
                // of maxima. If a candle upgrade fixes that, this assertion says so.
                let theirs = x.as_tensor().max_pool2d(k).unwrap();
                let ts = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(max_abs_diff(&ys, &ts), 0.0, "{what}: candle forward");
                let g2 = (theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let d2 = g2.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                let d2: Vec<f32> = d2
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v * (k * k) as f32)
                    .collect();
                assert!(
                    max_abs_diff(&dxs, &d2) < 1e-5,
                    "{what}: candle gradient times k^2"
                );
            }
            cases += 1;
        }
    }
    assert!(cases >= 20, "{cases}");
}

#[test]
fn ties_send_the_gradient_to_the_first_maximum() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), candle_core::DType::F32, &dev).unwrap())
        .unwrap();
    let y = selfsup_ops::max_pool2d(x.as_tensor(), 2, 2, 0).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    let expected = [
        1., 0., 1., 0., //
        0., 0., 0., 0., //
        1., 0., 1., 0., //
        0., 0., 0., 0.,
    ];
    assert_eq!(dx.to_vec1::<f32>().unwrap(), expected);
}

#[test]
fn a_nan_wins_its_window_and_takes_the_gradient() {
    // As PyTorch: the NaN is the window's maximum, so the output is NaN and the gradient goes
    // to it; the other windows of the plane are unaffected.
    let dev = Device::Cpu;
    let mut v: Vec<f32> = (0..16).map(|i| i as f32).collect();
    v[4] = f32::NAN; // window (0, 0) holds 0, 1, 4, 5
    let x = Var::from_tensor(&Tensor::from_vec(v, (1, 1, 4, 4), &dev).unwrap()).unwrap();
    let y = selfsup_ops::max_pool2d(x.as_tensor(), 2, 2, 0).unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(yv[0].is_nan());
    assert_eq!(&yv[1..], &[7., 13., 15.]);
    let r = Tensor::new(&[1f32, 2., 3., 4.], &dev)
        .unwrap()
        .reshape((1, 1, 2, 2))
        .unwrap();
    let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    let mut expected = [0f32; 16];
    (expected[4], expected[7], expected[13], expected[15]) = (1., 2., 3., 4.);
    assert_eq!(dx.to_vec1::<f32>().unwrap(), expected);
}

#[test]
fn bad_geometry_is_an_error() {
    let x = Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(selfsup_ops::max_pool2d(&x, 0, 1, 0).is_err());
    assert!(selfsup_ops::max_pool2d(&x, 3, 1, 2).is_err()); // padding over half the window
    assert!(selfsup_ops::max_pool2d(&x, 7, 1, 0).is_err());
    let ints = Tensor::zeros((1, 1, 4, 4), candle_core::DType::U8, &Device::Cpu).unwrap();
    assert!(selfsup_ops::max_pool2d(&ints, 2, 2, 0).is_err());
}

#[test]
fn global_avg_pool_matches_candle_values_and_gradients() {
    let dev = Device::Cpu;
    for shape in [(1, 1, 1, 1), (2, 3, 4, 4), (3, 64, 5, 7), (512, 256, 4, 4)] {
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., shape, &dev).unwrap()).unwrap();
        let ours = selfsup_ops::global_avg_pool(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().mean(3).unwrap().mean(2).unwrap();
        assert_eq!(ours.dims(), &[shape.0, shape.1]);
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{shape:?}");
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev).unwrap();
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "{shape:?} gradient");
    }
    let flat = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
    assert!(selfsup_ops::global_avg_pool(&flat).is_err());
    let empty = Tensor::zeros((2, 3, 0, 4), candle_core::DType::F32, &dev).unwrap();
    assert!(selfsup_ops::global_avg_pool(&empty).is_err());
}
