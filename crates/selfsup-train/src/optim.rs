//! Optimisers that own their state (so it can be checkpointed): SGD with momentum / Nesterov,
//! AdamW and LARS, with weight decay only on the parameters the method marks (not biases or
//! norm parameters, which LARS also leaves unadapted).
//!
//! Formulas (PyTorch's `torch.optim.SGD` and `AdamW`; LARS as in MoCo v3's `optimizer.py`):
//!
//! - SGD: `g = grad + wd p`; `buf = m buf + g` (`buf = g` at the first step);
//!   `d = g + m buf` (Nesterov) or `buf`; `p -= lr d`.
//! - AdamW: `p *= 1 - lr wd`; `m1 = b1 m1 + (1 - b1) g`; `m2 = b2 m2 + (1 - b2) g^2`;
//!   `p -= lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)`.
//! - LARS: for decayed parameters `g = grad + wd p`, `g *= eta ||p|| / ||g||` (1 when either norm
//!   is 0); `mu = m mu + g`; `p -= lr mu`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (and optionally Nesterov).
    Sgd,
    /// AdamW.
    Adamw,
    /// LARS (layer-wise adaptive rate scaling) over SGD with momentum.
    Lars,
}

impl std::str::FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "adamw" => Ok(Self::Adamw),
            "lars" => Ok(Self::Lars),
            _ => Err(Error::Config(format!(
                "unknown optimizer {s:?} (known: sgd, adamw, lars)"
            ))),
        }
    }
}

/// Optimiser hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Which optimiser.
    pub kind: OptimizerKind,
    /// Momentum (SGD, LARS) or beta1 (AdamW).
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (decoupled for AdamW).
    pub weight_decay: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// LARS trust coefficient.
    pub eta: f64,
    /// Learning-rate multiplier of the parameters without weight decay (biases, norm
    /// parameters): Barlow Twins' code trains them at 0.0048 / 0.2 = 0.024 of the weights' rate.
    #[serde(default = "one")]
    pub bias_lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

impl OptimConfig {
    /// Defaults for a kind: SGD m 0.9 wd 5e-4; AdamW b (0.9, 0.999) eps 1e-8 wd 0.05;
    /// LARS m 0.9 wd 1e-6 eta 0.02.
    pub fn defaults(kind: OptimizerKind) -> Self {
        match kind {
            OptimizerKind::Sgd => Self {
                kind,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 5e-4,
                beta2: 0.999,
                eps: 1e-8,
                eta: 0.02,
                bias_lr_scale: 1.0,
            },
            OptimizerKind::Adamw => Self {
                kind,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.05,
                beta2: 0.999,
                eps: 1e-8,
                eta: 0.02,
                bias_lr_scale: 1.0,
            },
            OptimizerKind::Lars => Self {
                kind,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 1e-6,
                beta2: 0.999,
                eps: 1e-8,
                eta: 0.02,
                bias_lr_scale: 1.0,
            },
        }
    }
}

/// One optimised parameter.
#[derive(Clone, Debug)]
pub struct Param {
    /// Name in the method's `VarMap`.
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Whether weight decay (and LARS adaptation) applies.
    pub decay: bool,
}

/// An optimiser with its state.
#[derive(Debug)]
pub struct Optim {
    cfg: OptimConfig,
    params: Vec<Param>,
    /// Per parameter: momentum buffer (SGD/LARS) or first moment (AdamW).
    m1: HashMap<String, Tensor>,
    /// AdamW second moment.
    m2: HashMap<String, Tensor>,
    /// Steps taken.
    t: u64,
}

impl Optim {
    /// An optimiser over `params`.
    pub fn new(cfg: OptimConfig, params: Vec<Param>) -> Result<Self> {
        for (n, v) in [
            ("momentum", cfg.momentum),
            ("weight_decay", cfg.weight_decay),
            ("beta2", cfg.beta2),
            ("eps", cfg.eps),
            ("eta", cfg.eta),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Config(format!(
                    "optimizer {n} must be finite and >= 0, got {v}"
                )));
            }
        }
        if cfg.momentum >= 1.0 || cfg.beta2 >= 1.0 {
            return Err(Error::Config("momentum / betas must be below 1".into()));
        }
        Ok(Self {
            cfg,
            params,
            m1: HashMap::new(),
            m2: HashMap::new(),
            t: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The parameters.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Global L2 norm of the gradients of the parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut s = 0.0;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                s += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(s.sqrt())
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first (for
    /// clipping). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg.clone();
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Detach: a gradient can still reference the forward graph (candle tracks ops on
            // tensors derived from variables), and a momentum buffer built from it would keep
            // every step's activations alive.
            let g = g.detach();
            let wd = if p.decay { c.weight_decay } else { 0.0 };
            let lr = if p.decay { lr } else { lr * c.bias_lr_scale };
            // SGD and LARS on f32 CPU parameters: plain loops instead of tensor ops.
            if c.kind != OptimizerKind::Adamw
                && g.dtype() == DType::F32
                && g.device().is_cpu()
                && p.var.dtype() == DType::F32
            {
                let lars = c.kind == OptimizerKind::Lars && p.decay;
                let buf = self.m1.get(&p.name);
                let buf = sgd_step_f32(&c, &p.var, &g, buf, grad_scale, lr, wd, lars)?;
                if let Some(b) = buf {
                    self.m1.insert(p.name.clone(), b);
                }
                continue;
            }
            let mut g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g
            };
            let w = &p.var.as_tensor().detach();
            let new_w = match c.kind {
                OptimizerKind::Sgd | OptimizerKind::Lars => {
                    if wd != 0.0 {
                        g = (g + (w * wd)?)?;
                    }
                    if c.kind == OptimizerKind::Lars && p.decay {
                        let pn = w
                            .sqr()?
                            .sum_all()?
                            .sqrt()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?;
                        let gn = g
                            .sqr()?
                            .sum_all()?
                            .sqrt()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?;
                        if pn > 0.0 && gn > 0.0 {
                            g = (g * (c.eta * pn / gn))?;
                        }
                    }
                    let d = if c.momentum != 0.0 {
                        let buf = match self.m1.get(&p.name) {
                            Some(b) => ((b * c.momentum)? + &g)?,
                            None => g.clone(),
                        };
                        let d = if c.nesterov {
                            (&g + (&buf * c.momentum)?)?
                        } else {
                            buf.clone()
                        };
                        self.m1.insert(p.name.clone(), buf);
                        d
                    } else {
                        g
                    };
                    (w - (d * lr)?)?
                }
                OptimizerKind::Adamw => {
                    let (b1, b2) = (c.momentum, c.beta2);
                    let w = if wd != 0.0 {
                        (w * (1.0 - lr * wd))?
                    } else {
                        w.clone()
                    };
                    let m = match self.m1.get(&p.name) {
                        Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
                        None => (&g * (1.0 - b1))?,
                    };
                    let v = match self.m2.get(&p.name) {
                        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                        None => (g.sqr()? * (1.0 - b2))?,
                    };
                    let bc1 = 1.0 - b1.powi(self.t as i32);
                    let bc2 = 1.0 - b2.powi(self.t as i32);
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let upd = (m.div(&denom)? * (lr / bc1))?;
                    self.m1.insert(p.name.clone(), m);
                    self.m2.insert(p.name.clone(), v);
                    (w - upd)?
                }
            };
            p.var.set(&new_w)?;
        }
        Ok(())
    }

    /// The state as named tensors (`NAME/m1`, `NAME/m2`) for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, v) in &self.m1 {
            out.insert(format!("{k}/m1"), v.clone());
        }
        for (k, v) in &self.m2 {
            out.insert(format!("{k}/m2"), v.clone());
        }
        out
    }

    /// Restore state saved by [`Optim::state_tensors`] after `steps` steps.
    pub fn load_state(&mut self, tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        self.m1.clear();
        self.m2.clear();
        let names: std::collections::HashSet<&str> =
            self.params.iter().map(|p| p.name.as_str()).collect();
        let device = self.params.first().map(|p| p.var.device().clone());
        for (k, v) in tensors {
            let (name, which) = k
                .rsplit_once('/')
                .ok_or_else(|| Error::Config(format!("bad optimizer state key {k:?}")))?;
            if !names.contains(name) {
                return Err(Error::Config(format!(
                    "optimizer state for unknown parameter {name:?}"
                )));
            }
            let v = match &device {
                Some(d) => v.to_device(d)?,
                None => v,
            };
            match which {
                "m1" => self.m1.insert(name.to_string(), v),
                "m2" => self.m2.insert(name.to_string(), v),
                _ => return Err(Error::Config(format!("bad optimizer state key {k:?}"))),
            };
        }
        self.t = steps;
        Ok(())
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup from `base / warmup` to `base` over
/// `warmup` steps, then cosine decay from `base` at step `warmup` to exactly `min_lr` at the last
/// step (`total - 1`).
pub fn lr_at(step: u64, total: u64, warmup: u64, base: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    // The last step is total - 1: it gets progress 1 (a span of total - warmup would stop one
    // step short of min_lr).
    let span = total.saturating_sub(warmup + 1).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// SGD / LARS on one f32 CPU parameter in a few passes over plain slices (the tensor
/// formulation of [`Optim::step`] costs about ten allocating tensor ops per parameter, a few
/// per cent of a small-cnn step): the same formulas, the norms summed in f64. Returns the new
/// momentum buffer (None without momentum).
#[allow(clippy::too_many_arguments)]
fn sgd_step_f32(
    c: &OptimConfig,
    var: &Var,
    g: &Tensor,
    buf: Option<&Tensor>,
    grad_scale: f64,
    lr: f64,
    wd: f64,
    lars: bool,
) -> Result<Option<Tensor>> {
    let w_t = var.as_tensor();
    let (shape, device) = (w_t.shape().clone(), w_t.device().clone());
    let mut g: Vec<f32> = g.flatten_all()?.to_vec1()?;
    let mut w: Vec<f32> = w_t.flatten_all()?.to_vec1()?;
    if g.len() != w.len() {
        return Err(Error::Config(format!(
            "gradient of {} values for a parameter of {}",
            g.len(),
            w.len()
        )));
    }
    if grad_scale != 1.0 {
        let s = grad_scale as f32;
        g.iter_mut().for_each(|x| *x *= s);
    }
    if wd != 0.0 {
        let s = wd as f32;
        g.iter_mut().zip(&w).for_each(|(x, &p)| *x += p * s);
    }
    if lars {
        let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let (pn, gn) = (norm(&w), norm(&g));
        if pn > 0.0 && gn > 0.0 {
            let s = (c.eta * pn / gn) as f32;
            g.iter_mut().for_each(|x| *x *= s);
        }
    }
    let lr32 = lr as f32;
    let new_buf = if c.momentum != 0.0 {
        let m = c.momentum as f32;
        let b: Vec<f32> = match buf {
            Some(b) => {
                let mut b: Vec<f32> = b.flatten_all()?.to_vec1()?;
                b.iter_mut().zip(&g).for_each(|(b, &x)| *b = *b * m + x);
                b
            }
            None => g.clone(),
        };
        if c.nesterov {
            w.iter_mut()
                .zip(g.iter().zip(&b))
                .for_each(|(p, (&x, &bb))| *p -= (x + bb * m) * lr32);
        } else {
            w.iter_mut().zip(&b).for_each(|(p, &bb)| *p -= bb * lr32);
        }
        Some(Tensor::from_vec(b, shape.clone(), &device)?)
    } else {
        w.iter_mut().zip(&g).for_each(|(p, &x)| *p -= x * lr32);
        None
    };
    var.set(&Tensor::from_vec(w, shape, &device)?)?;
    Ok(new_buf)
}
