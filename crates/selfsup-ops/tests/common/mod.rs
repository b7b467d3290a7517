//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use candle_core::{DType, Tensor};

/// `max |a - b| / max |b|` (the denominator at least 1e-6), in f64.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let d = d.max(0).unwrap().to_dtype(DType::F64).unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let s = s.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    d.to_scalar::<f64>().unwrap() / s.max(1e-6)
}

/// Training-mode BatchNorm (eps 1e-5) + ReLU of `x (N, C, H, W)` from candle's primitive ops:
/// `[relu(bn(x)), batch mean, biased batch variance]`.
pub fn bn_relu_train(x: &Tensor, w: &Tensor, b: &Tensor) -> [Tensor; 3] {
    let c = x.dim(1).unwrap();
    let shape = (1, c, 1, 1);
    let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap();
    let mean = mean.mean_keepdim(3).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(0).unwrap();
    let var = var.mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
    let h = xc
        .broadcast_div(&(&var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w.reshape(shape).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(shape).unwrap())
        .unwrap()
        .relu()
        .unwrap();
    [h, mean.flatten_all().unwrap(), var.flatten_all().unwrap()]
}

/// The gradients of `sum(y * r)`: a random projection `r` of `y`'s gradient, pulled back.
pub fn backward_of(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (y * r).unwrap().sum_all().unwrap().backward().unwrap()
}
