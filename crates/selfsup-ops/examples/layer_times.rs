use candle_core::{Device, Tensor, Var};
use std::time::Instant;
fn t<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut v = vec![];
    for _ in 0..5 {
        let s = Instant::now();
        f();
        v.push(s.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[2] * 1e3
}
fn main() {
    let dev = Device::Cpu;
    for &(c, o, h) in &[
        (3usize, 32usize, 32usize),
        (32, 64, 16),
        (64, 128, 8),
        (128, 256, 4),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (512, c, h, h), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev).unwrap()).unwrap();
        let fwd = t(|| {
            selfsup_ops::conv2d(x.as_tensor(), w.as_tensor(), 1, 1).unwrap();
        });
        let y = selfsup_ops::conv2d(x.as_tensor(), w.as_tensor(), 1, 1).unwrap();
        let r = Tensor::randn(0f32, 1., y.dims(), &dev).unwrap();
        let bwd = t(|| {
            (y.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        let g = Var::from_tensor(&Tensor::ones(o, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let b =
            Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let yv = Var::from_tensor(&y).unwrap();
        let bnf = t(|| {
            selfsup_ops::batch_norm_train(yv.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, true)
                .unwrap();
        });
        let z =
            selfsup_ops::batch_norm_train(yv.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, true)
                .unwrap()
                .y;
        let bnb = t(|| {
            (z.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        let mul = t(|| {
            (z.clone() * &r).unwrap().sum_all().unwrap();
        });
        let pf = t(|| {
            selfsup_ops::max_pool2d(yv.as_tensor(), 2, 2, 0).unwrap();
        });
        let p = selfsup_ops::max_pool2d(yv.as_tensor(), 2, 2, 0).unwrap();
        let rp = Tensor::randn(0f32, 1., p.dims(), &dev).unwrap();
        let pb = t(|| {
            (p.clone() * &rp)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        println!("{c}->{o} @{h}: conv fwd {fwd:.1} ms, bwd(+mul) {bwd:.1}; bn+relu fwd {bnf:.1} bwd(+mul) {bnb:.1}; mul+sum {mul:.1}; pool fwd {pf:.1} bwd {pb:.1}");
    }
}
