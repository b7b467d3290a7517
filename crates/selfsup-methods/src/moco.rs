//! MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved Baselines with Momentum Contrastive
//! Learning"): a query encoder + MLP head trained with InfoNCE against keys from a momentum copy,
//! with a FIFO queue of earlier keys as the negatives.
//!
//! Step `t`: `q = head(encoder(v0))`, `k = target_head(target_encoder(v1))` (no gradient,
//! normalised), loss `InfoNCE(q, k, queue)` where the queue holds keys of steps `< t` only
//! (initially random unit vectors, as in MoCo's code). In `after_step` the target moves by EMA
//! and `k` is written into the queue at its pointer (oldest keys overwritten first). With
//! `symmetric`, the loss is `(InfoNCE(q0, k1) + InfoNCE(q1, k0)) / 2` and `k1` is enqueued.
//!
//! The queue `(K, D)` and its pointer live in the `VarMap` (`state.queue`, `state.queue_ptr`),
//! so checkpoints resume it exactly. There is no shuffling BatchNorm, as in lightly's
//! single-GPU CIFAR-10 benchmark. Data-parallel: queries and keys are gathered from every rank,
//! so the loss covers the global batch and every rank enqueues the same (global) keys.

use std::sync::Mutex;

use candle_core::{Tensor, Var};
use candle_nn::{Init, VarMap};
use selfsup_losses::ops::normalize;
use selfsup_losses::InfoNce;
use selfsup_models::heads::moco_projection;
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use crate::ema::{ema_update, momentum_at, target_pairs, Momentum};
use crate::{two_views, Error, Method, Placement, Result, StepOutput};

/// MoCo v2 hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MocoConfig {
    /// Head hidden width (512 in lightly's CIFAR-10 benchmark for ResNet-18).
    pub hidden_dim: usize,
    /// Key dimension (128).
    pub out_dim: usize,
    /// InfoNCE temperature (0.2 in MoCo v2 on ImageNet; 0.1 in lightly's CIFAR-10 benchmark).
    pub temperature: f64,
    /// Keys in the queue (4096 for CIFAR-10, lightly's benchmark; 65536 on ImageNet).
    pub queue_size: usize,
    /// Momentum of the key encoder (0.99, constant).
    pub momentum: Momentum,
    /// Symmetric loss over both views.
    pub symmetric: bool,
}

impl Default for MocoConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 512,
            out_dim: 128,
            temperature: 0.1,
            queue_size: 4096,
            momentum: Momentum {
                base: 0.99,
                cosine: false,
            },
            symmetric: false,
        }
    }
}

/// MoCo v2.
pub struct Moco {
    comm: selfsup_dist::Comm,
    varmap: VarMap,
    encoder: Box<dyn Encoder>,
    head: Head,
    target_encoder: Box<dyn Encoder>,
    target_head: Head,
    pairs: Vec<(Var, Var)>,
    queue: Var,
    ptr: Var,
    pending: Mutex<Option<Tensor>>,
    loss: InfoNce,
    cfg: MocoConfig,
}

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().unwrap()[name].clone()
}

impl Moco {
    /// Build with fresh weights drawn from `seed`; the key encoder starts as a copy.
    pub fn new(kind: &EncoderKind, cfg: &MocoConfig, seed: u64, at: &Placement) -> Result<Self> {
        if cfg.queue_size == 0 {
            return Err(Error::Config("MoCo needs a queue of at least 1 key".into()));
        }
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let d = encoder.feature_dim();
        let spec = moco_projection(d, cfg.hidden_dim, cfg.out_dim);
        let head = Head::new(&spec, vb.pp("projection_head"))?;
        let target_encoder = build_encoder(kind, vb.pp("target_encoder"))?;
        let target_head = Head::new(&spec, vb.pp("target_projection_head"))?;
        let st = vb.pp("state");
        st.get_with_hints(
            (cfg.queue_size, cfg.out_dim),
            "queue",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        st.get_with_hints(1, "queue_ptr", Init::Const(0.0))?;
        let queue = var(&varmap, "state.queue");
        queue.set(&normalize(queue.as_tensor())?)?;
        let ptr = var(&varmap, "state.queue_ptr");
        let pairs = target_pairs(&varmap, &["encoder.", "projection_head."])?;
        Ok(Self {
            comm: at.comm.clone(),
            varmap,
            encoder,
            head,
            target_encoder,
            target_head,
            pairs,
            queue,
            ptr,
            pending: Mutex::new(None),
            loss: InfoNce::new(cfg.temperature)?,
            cfg: cfg.clone(),
        })
    }

    /// The queue `(K, D)` of normalised keys (a copy).
    pub fn queue(&self) -> Result<Tensor> {
        Ok(self.queue.as_tensor().copy()?)
    }

    /// Where the next key is written.
    pub fn queue_ptr(&self) -> Result<usize> {
        Ok(self.ptr.as_tensor().to_vec1::<f32>()?[0] as usize)
    }

    /// Normalised keys of `x` from the momentum encoder (no gradient), in train mode.
    pub fn keys(&self, x: &Tensor) -> Result<Tensor> {
        let k = self
            .target_head
            .forward_t(&self.target_encoder.forward_t(x, true)?, true)?;
        Ok(normalize(&k.detach())?)
    }

    fn enqueue(&self, keys: &Tensor) -> Result<()> {
        let k_len = self.cfg.queue_size;
        let n = keys.dim(0)?;
        // More keys than slots: only the newest K survive.
        let keys = if n > k_len {
            keys.narrow(0, n - k_len, k_len)?
        } else {
            keys.clone()
        };
        let n = keys.dim(0)?;
        let mut q = self.queue.as_tensor().copy()?;
        let mut p = self.queue_ptr()?;
        let mut done = 0;
        while done < n {
            let len = (n - done).min(k_len - p);
            q = q.slice_scatter0(&keys.narrow(0, done, len)?, p)?;
            p = (p + len) % k_len;
            done += len;
        }
        self.queue.set(&q)?;
        self.ptr
            .set(&Tensor::new(&[p as f32], self.ptr.device())?)?;
        Ok(())
    }
}

impl Method for Moco {
    fn name(&self) -> &str {
        "moco"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        let (v0, v1) = two_views(views, "MoCo")?;
        let queue = self.queue.as_tensor().detach();
        let query = |x: &Tensor| -> Result<Tensor> {
            Ok(self
                .head
                .forward_t(&self.encoder.forward_t(x, true)?, true)?)
        };
        // Queries and keys of every rank: the loss covers the global batch, and the queue
        // takes every rank's keys (the same queue on each rank).
        let g = |t: Tensor| crate::gather(&self.comm, &t);
        let gd = |t: Tensor| crate::gather_detached(&self.comm, &t);
        let (loss, q0, enq) = if self.cfg.symmetric {
            // Each view is its own BatchNorm batch in each encoder: a batch holding both views
            // of an image lets BatchNorm statistics carry which query matches which key (the
            // leak MoCo's shuffle-BN exists to prevent).
            let (q0, q1) = (g(query(v0)?)?, g(query(v1)?)?);
            let (k0, k1) = (gd(self.keys(v0)?)?, gd(self.keys(v1)?)?);
            let l = ((self.loss.loss_with_negatives(&q0, &k1, Some(&queue))?
                + self.loss.loss_with_negatives(&q1, &k0, Some(&queue))?)?
                * 0.5)?;
            (l, q0, k1)
        } else {
            let q0 = g(query(v0)?)?;
            let k1 = gd(self.keys(v1)?)?;
            let l = self.loss.loss_with_negatives(&q0, &k1, Some(&queue))?;
            (l, q0, k1)
        };
        *self.pending.lock().unwrap() = Some(enq);
        Ok(StepOutput {
            loss,
            metrics: vec![],
            embeddings: q0.detach(),
        })
    }

    fn after_step(&mut self, step: u64, total_steps: u64) -> Result<()> {
        ema_update(
            &self.pairs,
            momentum_at(self.cfg.momentum, step, total_steps),
        )?;
        if let Some(k) = self.pending.lock().unwrap().take() {
            self.enqueue(&k)?;
        }
        Ok(())
    }

    fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}
