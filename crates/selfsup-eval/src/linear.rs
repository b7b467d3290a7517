//! Linear probe: a linear classifier on frozen, precomputed features.
//!
//! Features are standardised with the training set's mean and standard deviation, then a
//! `Linear(D, classes)` is trained with cross-entropy by mini-batch AdamW (seeded shuffling),
//! and evaluated on the test features: top-1 and top-5.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::knn::topk_accuracy;
use crate::{Error, Result};

/// Linear-probe hyper-parameters.
#[derive(Clone, Debug)]
pub struct LinearProbeConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Shuffling seed.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 1e-3,
            weight_decay: 1e-4,
            batch_size: 512,
            seed: 0,
        }
    }
}

impl LinearProbeConfig {
    /// Positive epochs, batch size and finite learning rate, finite weight decay >= 0; callers
    /// check this before spending time on features.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0
            || self.batch_size == 0
            || !(self.lr.is_finite() && self.lr > 0.0)
            || !(self.weight_decay.is_finite() && self.weight_decay >= 0.0)
        {
            return Err(Error::Input(format!(
                "the linear probe needs epochs > 0, batch size > 0, lr > 0 and weight decay >= 0, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Probe accuracy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeResult {
    /// Top-1 accuracy on the test features (fraction).
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
    /// Top-1 on the training features.
    pub train_top1: f64,
}

/// Train a linear classifier on `train` and report its accuracy on `test`.
pub fn linear_probe(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    test_labels: &[usize],
    classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<ProbeResult> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let train = train.to_device(&dev)?.to_dtype(DType::F32)?;
    let test = test.to_device(&dev)?.to_dtype(DType::F32)?;
    crate::check_finite("linear probe", "training", &train)?;
    crate::check_finite("linear probe", "test", &test)?;
    let (n, d) = train.dims2()?;
    if n != train_labels.len() || test.dim(0)? != test_labels.len() || test.dim(1)? != d || n == 0 {
        return Err(Error::Input(format!(
            "linear probe: train {:?} / {} labels, test {:?} / {} labels do not fit",
            train.dims(),
            train_labels.len(),
            test.dims(),
            test_labels.len()
        )));
    }
    let mean = train.mean_keepdim(0)?;
    let std = train
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .clamp(1e-6, f64::INFINITY)?;
    let norm = |x: &Tensor| -> Result<Tensor> { Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?) };
    let train = norm(&train)?;
    let test = norm(&test)?;
    let w = Var::zeros((d, classes), DType::F32, &dev)?;
    let b = Var::zeros(classes, DType::F32, &dev)?;
    let mut opt = candle_nn::AdamW::new(
        vec![w.clone(), b.clone()],
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let labels_t = Tensor::from_vec(
        train_labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let bs = cfg.batch_size;
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(bs) {
            let idx = Tensor::from_slice(chunk, chunk.len(), &dev)?;
            let x = train.index_select(&idx, 0)?;
            let y = labels_t.index_select(&idx, 0)?;
            let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let loss = selfsup_losses::ops::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
        }
    }
    let scores = |x: &Tensor| -> Result<Vec<Vec<f32>>> {
        Ok(x.matmul(w.as_tensor())?
            .broadcast_add(b.as_tensor())?
            .to_vec2()?)
    };
    let (top1, top5) = topk_accuracy(&scores(&test)?, test_labels);
    let (train_top1, _) = topk_accuracy(&scores(&train)?, train_labels);
    Ok(ProbeResult {
        top1,
        top5,
        train_top1,
    })
}
