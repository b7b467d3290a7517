//! Seeded parameter initialisation.
//!
//! candle's CPU generator cannot be seeded, so parameters are drawn here from a ChaCha8
//! generator: [`seeded_var_builder`] returns a `VarBuilder` whose backend creates every missing
//! variable from the `Init` hint the layer asks for, in the order the model is built. One seed
//! therefore fixes every weight of a run.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A `VarMap` that creates missing variables from a seeded generator.
pub struct SeededBackend {
    varmap: VarMap,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
}

impl SeededBackend {
    /// Wrap `varmap`; new variables are drawn from `seed`.
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self {
            varmap,
            rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        }
    }
}

fn fans(shape: &Shape) -> (usize, usize) {
    let d = shape.dims();
    match d.len() {
        0 => (1, 1),
        1 => (d[0], d[0]),
        _ => {
            let rf: usize = d[2..].iter().product();
            (d[1] * rf, d[0] * rf)
        }
    }
}

/// Draw a tensor for `init` from `rng` (f32 values, then cast).
pub fn draw(
    init: Init,
    shape: &Shape,
    rng: &mut impl Rng,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let v: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let (fi, fo) = fans(shape);
            let f = match fan {
                FanInOut::FanIn => fi,
                FanInOut::FanOut => fo,
            } as f64;
            let std = non_linearity.gain() / f.sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n)
                    .map(|_| {
                        let z: f64 = StandardNormal.sample(rng);
                        (std * z) as f32
                    })
                    .collect(),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
                }
            }
        }
    };
    Tensor::from_vec(v, shape.clone(), dev)?.to_dtype(dtype)
}

impl candle_nn::var_builder::SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap();
        if let Some(v) = data.get(name) {
            let t = v.as_tensor();
            if t.shape() != &s {
                candle_core::bail!(
                    "variable {name} has shape {:?}, the model asks for {s:?}",
                    t.shape()
                )
            }
            return t.to_dtype(dtype);
        }
        let t = draw(h, &s, &mut *self.rng.lock().unwrap(), dtype, dev)?;
        let v = Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        data.insert(name.to_string(), v);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let data = self.varmap.data().lock().unwrap();
        match data.get(name) {
            Some(v) => v.as_tensor().to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap().contains_key(name)
    }
}

/// A `VarBuilder` that fills `varmap` with parameters drawn from `seed` (PyTorch's default
/// initialisation for each layer, see [`crate::layers`]). Variables already in `varmap` are
/// reused as they are.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededBackend::new(varmap.clone(), seed)),
        dtype,
        device.clone(),
    )
}
