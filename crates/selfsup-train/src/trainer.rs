//! The training loop.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use selfsup_data::Loader;
use selfsup_dist::Comm;
use selfsup_eval::{extract_features_tta, knn, KnnConfig, Tta};
use selfsup_methods::{Method, ENCODER_PREFIX};

use crate::budget::{fit_epochs, refit_epochs, EpochCosts};
use crate::checkpoint::{self, TrainState};
use crate::optim::{lr_at, Optim, OptimConfig, Param};
use crate::{Error, Result, TrainConfig};

/// Data for the kNN monitor: the training set without augmentation (the memory bank) and the
/// test set, both with labels. In a data-parallel run each rank holds its contiguous share of
/// both ([`shard_range`]); the trainer gathers the features and rank 0 votes.
pub struct KnnMonitor {
    /// Training images, normalisation only, unshuffled.
    pub bank: Loader,
    /// Test images, normalisation only, unshuffled.
    pub test: Loader,
    /// Number of classes.
    pub classes: usize,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Epochs completed in total.
    pub epochs: usize,
    /// Steps in total.
    pub steps: u64,
    /// Mean loss of the first epoch run in this call.
    pub first_loss: Option<f64>,
    /// Mean loss of the last epoch.
    pub last_loss: Option<f64>,
    /// kNN top-1 after each epoch where it was measured: (epoch, top1).
    pub knn: Vec<(usize, f64)>,
    /// Wall seconds of this call.
    pub wall_s: f64,
    /// Training images per second (this call).
    pub images_per_s: f64,
    /// Share of the time spent waiting for data.
    pub data_wait: f64,
}

/// A training run: method, optimiser, data and run folder.
pub struct Trainer {
    cfg: TrainConfig,
    method: Box<dyn Method>,
    optim: Optim,
    loader: Loader,
    monitor: Option<KnnMonitor>,
    device: Device,
    run_dir: PathBuf,
    epoch: usize,
    step: u64,
    last_knn: Option<f64>,
    comm: Comm,
    /// Seconds spent in the gradient all-reduce (this call of `fit`).
    comm_s: f64,
    /// The run folder's lock (rank 0, from `resume` or `fit` on).
    lock: Option<crate::RunLock>,
    /// Set (by a signal handler) to stop between two steps.
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Where rank 0 reports progress (the CLI's progress bar); the library draws nothing.
    progress: Option<Box<dyn Progress>>,
    /// Whole training images for `bn_recalibrate` (this rank's part of shuffled global batches).
    bn_data: Option<Loader>,
    /// Seconds the last kNN evaluation spent extracting and gathering features (the rest of
    /// it is the vote, paid once whatever the views): the time budget's measure of a view.
    knn_extract_s: std::cell::Cell<f64>,
}

/// The optimiser's view of a method: its trainable variables, each marked for weight decay or not.
pub fn method_params(method: &dyn Method) -> Vec<Param> {
    let names = method.trainable();
    let data = method.varmap().data().lock().unwrap();
    names
        .into_iter()
        .map(|name| {
            let var = data[&name].clone();
            let decay = method.weight_decay(&name, var.as_tensor());
            Param { name, var, decay }
        })
        .collect()
}

/// Parse `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| Error::Config(format!("bad device {s:?} (cpu or cuda:N)")))?;
            Device::new_cuda(n).map_err(|e| {
                Error::Config(format!("cannot use {s}: {e} (build with --features cuda)"))
            })
        }
        _ => Err(Error::Config(format!("bad device {s:?} (cpu or cuda:N)"))),
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The collapse guard warns when [`embedding_std`] falls below this fraction of `1/sqrt(D)`
/// (the value for embeddings spread evenly over the sphere).
pub const COLLAPSE_FRACTION: f64 = 0.1;

/// Mean over dimensions of the per-dimension standard deviation of L2-normalised embeddings:
/// about `1/sqrt(D)` when embeddings spread over the sphere, 0 when they collapse to a point.
pub fn embedding_std(z: &Tensor) -> Result<f64> {
    let z = selfsup_eval::l2_normalize(&z.to_dtype(DType::F32)?)?;
    let c = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    scalar(&c.sqr()?.mean(0)?.sqrt()?.mean_all()?)
}

impl Trainer {
    /// Set up a run in one process (nothing is written yet).
    pub fn new(
        cfg: TrainConfig,
        method: Box<dyn Method>,
        loader: Loader,
        monitor: Option<KnnMonitor>,
        device: Device,
    ) -> Result<Self> {
        Self::new_dist(cfg, method, loader, monitor, device, selfsup_dist::single())
    }

    /// Set up a run as one rank of `comm`: `loader` must yield this rank's shard of every
    /// global batch, and `method` must have been built with `comm` (it gathers embeddings).
    /// Parameters and buffers are made rank 0's at the start of [`Trainer::fit`]; only rank 0
    /// writes to the run folder.
    pub fn new_dist(
        cfg: TrainConfig,
        method: Box<dyn Method>,
        loader: Loader,
        monitor: Option<KnnMonitor>,
        device: Device,
        comm: Comm,
    ) -> Result<Self> {
        cfg.validate()?;
        let shard = loader.config().shard;
        if shard != (comm.rank(), comm.world_size()) {
            return Err(Error::Config(format!(
                "the loader yields shard {} of {}, but this is rank {} of {}",
                shard.0,
                shard.1,
                comm.rank(),
                comm.world_size()
            )));
        }
        let mut ocfg = OptimConfig::defaults(cfg.optimizer);
        ocfg.momentum = cfg.momentum;
        ocfg.nesterov = cfg.nesterov;
        ocfg.weight_decay = cfg.weight_decay;
        ocfg.eta = cfg.lars_eta;
        ocfg.bias_lr_scale = cfg.bias_lr_scale;
        let params = method_params(method.as_ref());
        let optim = Optim::new(ocfg, params)?;
        let run_dir = PathBuf::from(&cfg.out);
        Ok(Self {
            cfg,
            method,
            optim,
            loader,
            monitor,
            device,
            run_dir,
            epoch: 0,
            step: 0,
            last_knn: None,
            comm,
            comm_s: 0.0,
            lock: None,
            stop: None,
            progress: None,
            bn_data: None,
            knn_extract_s: std::cell::Cell::new(0.0),
        })
    }

    /// The images `bn_recalibrate` re-estimates the encoder's BatchNorm statistics on after the
    /// last epoch: training images as evaluation sees them (`selfsup_data::Preset::None`),
    /// shuffled, full batches, this rank's shard of every global batch
    /// ([`crate::setup`] builds it from the run's dataset).
    pub fn set_bn_data(&mut self, loader: Loader) {
        self.bn_data = Some(loader);
    }

    /// What the budget expects the run to spend after its last epoch besides the kNN
    /// evaluation, from the cost `knn_s` of one periodic evaluation, `extract_s` of it spent
    /// on the features of its views: the BatchNorm recalibration, a training-mode pass over
    /// the bank's images, about one plain view's extraction; and, when the final evaluation
    /// averages over more views than the periodic ones, those views' extraction (the vote is
    /// paid once).
    fn final_cost(&self, knn_s: f64, extract_s: f64) -> f64 {
        let extract_s = if extract_s > 0.0 { extract_s } else { knn_s };
        let monitor_views = self.cfg.monitor_tta().views() as f64;
        let per_view = extract_s / monitor_views;
        let recalibrate = if self.cfg.bn_recalibrate {
            per_view
        } else {
            0.0
        };
        let final_views = self.cfg.final_tta().views() as f64;
        recalibrate + per_view * (final_views - monitor_views).max(0.0)
    }

    /// The test-time augmentation of a kNN evaluation now: the final evaluation's once the
    /// last epoch is done, the monitor's before.
    fn knn_tta(&self) -> Tta {
        if self.epoch >= self.cfg.epochs {
            self.cfg.final_tta()
        } else {
            self.cfg.monitor_tta()
        }
    }

    /// Precise BatchNorm on the encoder (every rank; rank 0's buffers on every rank after it):
    /// see [`selfsup_eval::recalibrate_batch_norm`].
    fn recalibrate_bn(&self) -> Result<()> {
        let Some(data) = &self.bn_data else {
            return Err(Error::Config(
                "bn_recalibrate needs the images to recalibrate on (Trainer::set_bn_data)".into(),
            ));
        };
        let t = Instant::now();
        let images =
            selfsup_eval::recalibrate_batch_norm(self.method.encoder(), data, &self.device, None)?;
        if self.comm.world_size() > 1 && !self.cfg.sync_bn {
            // Without synchronised BatchNorm each rank saw its own part of each batch.
            self.broadcast_vars(&self.var_names(selfsup_models::layers::is_buffer))?;
        }
        if self.is_writer() {
            tracing::info!(
                "BatchNorm statistics recalibrated on {} whole training images ({:.0} s)",
                images * self.comm.world_size(),
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Stop between two steps once `flag` is set (a SIGINT / SIGTERM handler sets it): the step
    /// under way is abandoned, nothing half-written is left, and `fit` returns
    /// [`Error::Interrupted`]. Data-parallel: every rank stops at the same step.
    pub fn set_stop_flag(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Some(flag);
    }

    /// Report progress to `p` (rank 0 only; `fit` then logs no per-step lines).
    pub fn set_progress(&mut self, p: Box<dyn Progress>) {
        self.progress = Some(p);
    }

    /// Use a lock of the run folder taken earlier (the CLI takes it before its own checks).
    pub fn adopt_lock(&mut self, lock: crate::RunLock) {
        self.lock = Some(lock);
    }

    /// Rank 0 takes the run folder's lock (once): a second process training into it fails.
    fn hold_run(&mut self) -> Result<()> {
        if self.is_writer() && self.lock.is_none() {
            self.lock = Some(crate::RunLock::acquire(&self.run_dir)?);
        }
        Ok(())
    }

    /// Whether this process writes the run folder (rank 0).
    pub fn is_writer(&self) -> bool {
        self.comm.rank() == 0
    }

    /// The data-parallel group.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Every variable (parameters, buffers, targets, state) takes rank 0's value, so that all
    /// ranks start from the same weights (fresh or resumed). One broadcast per dtype.
    pub fn broadcast_state(&self) -> Result<()> {
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        self.broadcast_vars(&self.var_names(|_| true))
    }

    /// The names of the method's variables that `keep` accepts, sorted (the same order on every
    /// rank).
    fn var_names(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut v: Vec<String> = self
            .method
            .varmap()
            .data()
            .lock()
            .unwrap()
            .keys()
            .filter(|k| keep(k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Rank 0's values of the variables `names` (same order on every rank) on every rank.
    fn broadcast_vars(&self, names: &[String]) -> Result<()> {
        let data = self.method.varmap().data().lock().unwrap();
        let vars: Vec<&candle_core::Var> = names.iter().map(|n| &data[n]).collect();
        for dtype in [DType::F32, DType::F64] {
            let sel: Vec<&&candle_core::Var> = vars.iter().filter(|v| v.dtype() == dtype).collect();
            if sel.is_empty() {
                continue;
            }
            let flat = Tensor::cat(
                &sel.iter()
                    .map(|v| v.as_tensor().detach().flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?,
                0,
            )?
            .to_device(&Device::Cpu)?;
            let out = if dtype == DType::F32 {
                let mut b = flat.to_vec1::<f32>()?;
                selfsup_dist::broadcast_f32(self.comm.as_ref(), &mut b, 0)?;
                Tensor::from_vec(b, flat.shape(), &Device::Cpu)?
            } else {
                let mut b = flat.to_vec1::<f64>()?;
                selfsup_dist::broadcast_f64(self.comm.as_ref(), &mut b, 0)?;
                Tensor::from_vec(b, flat.shape(), &Device::Cpu)?
            };
            let mut at = 0;
            for v in sel {
                let n = v.elem_count();
                let t = out
                    .narrow(0, at, n)?
                    .reshape(v.shape())?
                    .to_device(v.device())?;
                v.set(&t)?;
                at += n;
            }
        }
        if let Some(v) = vars
            .iter()
            .find(|v| !matches!(v.dtype(), DType::F32 | DType::F64))
        {
            return Err(Error::Config(format!(
                "data-parallel training supports f32 and f64 variables, not {:?}",
                v.dtype()
            )));
        }
        Ok(())
    }

    fn all_reduce_grads(&mut self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        let t0 = Instant::now();
        all_reduce_gradients(self.comm.as_ref(), self.optim.params(), grads)?;
        self.comm_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Seconds this rank spent in gradient all-reduces since the trainer was built.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_s
    }

    /// The method.
    pub fn method(&self) -> &dyn Method {
        self.method.as_ref()
    }

    /// Epochs completed.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// The run folder.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Load the latest checkpoint of the run folder, if there is one. Returns whether it did.
    pub fn resume(&mut self) -> Result<bool> {
        self.hold_run()?;
        let Some(dir) = checkpoint::latest(&self.run_dir) else {
            return Ok(false);
        };
        let st = checkpoint::read_state(&dir)?;
        if st.method != self.cfg.method || st.encoder != self.cfg.encoder {
            return Err(Error::Checkpoint(format!(
                "{} holds a {} / {} run, not {} / {}",
                dir.display(),
                st.method,
                st.encoder,
                self.cfg.method,
                self.cfg.encoder
            )));
        }
        let model = checkpoint::read_tensors(&dir.join("model.safetensors"))?;
        {
            let data = self.method.varmap().data().lock().unwrap();
            for (name, var) in data.iter() {
                let t = model.get(name).ok_or_else(|| {
                    Error::Checkpoint(format!("{}: model.safetensors lacks {name}", dir.display()))
                })?;
                if t.shape() != var.shape() {
                    return Err(Error::Checkpoint(format!(
                        "{}: {name} has shape {:?}, the model {:?}",
                        dir.display(),
                        t.dims(),
                        var.dims()
                    )));
                }
                var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
            }
        }
        let opt = checkpoint::read_tensors(&dir.join("optimizer.safetensors"))?;
        self.optim.load_state(opt, st.step)?;
        self.epoch = st.epoch;
        self.step = st.step;
        self.last_knn = st.knn_top1;
        if st.world_size != self.comm.world_size() {
            // Supported: the global batch, the data order and every crop are the same for any
            // rank count; only per-rank BatchNorm (without sync_bn) sees other batches.
            tracing::info!(
                "resuming a run trained on {} rank(s) with {}: same global batch and data order",
                st.world_size,
                self.comm.world_size()
            );
        }
        if self.is_writer() {
            truncate_metrics(&self.run_dir.join("metrics.jsonl"), self.step, self.epoch)?;
        }
        tracing::info!(
            "resumed {} at epoch {} (step {})",
            dir.display(),
            self.epoch,
            self.step
        );
        Ok(true)
    }

    fn save(&self) -> Result<()> {
        let all = selfsup_models::io::named_tensors(self.method.varmap());
        let model: HashMap<String, Tensor> = all.iter().cloned().collect();
        let encoder: HashMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(ENCODER_PREFIX)
                    .map(|k| (k.to_string(), t.clone()))
            })
            .collect();
        let st = TrainState {
            epoch: self.epoch,
            step: self.step,
            method: self.cfg.method.clone(),
            encoder: self.cfg.encoder.clone(),
            feature_dim: self.method.encoder().feature_dim(),
            knn_top1: self.last_knn,
            world_size: self.comm.world_size(),
            files: Default::default(),
        };
        checkpoint::save(
            &self.run_dir,
            &model,
            &encoder,
            &self.optim.state_tensors(),
            &st,
            &self.cfg.to_toml(),
        )?;
        Ok(())
    }

    /// kNN top-1 / top-5 of the current encoder with the monitor's data, on flip-averaged
    /// features with `knn_flip`, or with the final evaluation's augmentation
    /// ([`TrainConfig::final_tta`]) once the last epoch is done.
    /// Data-parallel: every rank extracts the features of its share, they are gathered, and
    /// only rank 0 gets a result (the others `None`); every rank must call it.
    pub fn knn_eval(&self) -> Result<Option<(f64, f64)>> {
        let Some(m) = &self.monitor else {
            return Ok(None);
        };
        let tta = self.knn_tta();
        let t = Instant::now();
        let bank = extract_features_tta(self.method.encoder(), &m.bank, &self.device, tta)?;
        let test = extract_features_tta(self.method.encoder(), &m.test, &self.device, tta)?;
        let (Some(bl), Some(tl)) = (&bank.labels, &test.labels) else {
            return Err(Error::Config("the kNN monitor needs labelled data".into()));
        };
        let (bank_x, bl) = gather_features(&self.comm, &bank.x, bl)?;
        let (test_x, tl) = gather_features(&self.comm, &test.x, tl)?;
        self.knn_extract_s.set(t.elapsed().as_secs_f64());
        if !self.is_writer() {
            return Ok(None);
        }
        let cfg = KnnConfig {
            k: self.cfg.knn_k,
            temperature: self.cfg.knn_temperature,
        };
        Ok(Some(knn(&bank_x, &bl, &test_x, &tl, m.classes, cfg)?))
    }

    /// The budget's length for the costs measured so far: the first fit (`refit` None) or a
    /// refit that may lengthen the run (`Some(true)`) or only shorten it (`Some(false)`).
    /// Rank 0 decides for every rank.
    fn decide_length(
        &self,
        costs: EpochCosts,
        max_epochs: usize,
        refit: Option<bool>,
        writer: bool,
    ) -> Result<usize> {
        let (budget, done, every) = (self.cfg.time_budget_s, self.epoch, self.cfg.knn_every);
        let mut n = [if writer {
            (match refit {
                None => fit_epochs(budget, costs, done, max_epochs, every),
                Some(grow) => refit_epochs(
                    self.cfg.epochs,
                    budget,
                    costs,
                    done,
                    max_epochs,
                    every,
                    grow,
                ),
            }) as f64
        } else {
            0.0
        }];
        self.comm.all_reduce_sum_f64(&mut n)?;
        Ok(n[0] as usize)
    }

    /// Fix the run's length at `fitted` epochs: logged, a `"kind":"budget"` metrics line, and
    /// the run's config.toml rewritten before the next checkpoint (a resumed run keeps it).
    fn set_length(
        &mut self,
        fitted: usize,
        max_epochs: usize,
        costs: EpochCosts,
        writer: bool,
        metrics: &mut Option<std::fs::File>,
        metrics_path: &std::path::Path,
    ) -> Result<()> {
        if writer {
            tracing::info!(
                "time budget {:.0} s after epoch {} ({:.0} s spent; an epoch takes {:.0} s, a kNN evaluation {:.0} s): training {fitted} epochs",
                self.cfg.time_budget_s,
                self.epoch,
                costs.elapsed_s,
                costs.epoch_s,
                costs.knn_s,
            );
            let line = serde_json::json!({
                "kind": "budget", "budget_s": self.cfg.time_budget_s, "epoch": self.epoch,
                "elapsed_s": costs.elapsed_s, "epoch_s": costs.epoch_s,
                "knn_s": costs.knn_s, "max_epochs": max_epochs, "epochs": fitted,
            });
            if let Some(metrics) = metrics.as_mut() {
                writeln!(metrics, "{line}").map_err(|source| Error::Io {
                    path: metrics_path.to_path_buf(),
                    source,
                })?;
            }
        }
        self.cfg.epochs = fitted;
        if writer {
            crate::write_atomic(
                &self.run_dir.join("config.toml"),
                self.cfg.to_toml().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Train until `cfg.epochs` (or `stop_after` more epochs), checkpointing after every epoch.
    pub fn fit(&mut self, stop_after: Option<usize>) -> Result<Summary> {
        self.hold_run()?;
        // Every rank starts from rank 0's weights (fresh or resumed).
        self.broadcast_state()?;
        let writer = self.is_writer();
        let buffers: Vec<String> = if self.comm.world_size() > 1 && !self.cfg.sync_bn {
            self.var_names(selfsup_models::layers::is_buffer)
        } else {
            Vec::new()
        };
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = if writer {
            std::fs::create_dir_all(&self.run_dir).map_err(|source| Error::Io {
                path: self.run_dir.clone(),
                source,
            })?;
            let cfg_path = self.run_dir.join("config.toml");
            crate::write_atomic(&cfg_path, self.cfg.to_toml().as_bytes())?;
            // A fresh run (nothing resumed) starts a new file: lines left by a run that
            // stopped before its first checkpoint are not this run's.
            let fresh = self.step == 0;
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(!fresh)
                    .truncate(fresh)
                    .open(&metrics_path)
                    .map_err(|source| Error::Io {
                        path: metrics_path.clone(),
                        source,
                    })?,
            )
        } else {
            None
        };
        let per_epoch = self.loader.num_batches() as u64;
        let mut total = per_epoch * self.cfg.epochs as u64;
        let warmup = (self.cfg.warmup_epochs * per_epoch as f64).round() as u64;
        let end_at = |epochs: usize, from: usize| match stop_after {
            Some(k) => (from + k).min(epochs),
            None => epochs,
        };
        let first_epoch = self.epoch;
        let mut end = end_at(self.cfg.epochs, first_epoch);
        // A fresh run with a time budget fits its length after the first epoch.
        let fitting = self.cfg.time_budget_s > 0.0 && self.step == 0;
        // The configured epochs cap every fit; kNN seconds spent and evaluations so far.
        let max_epochs = self.cfg.epochs;
        // kNN evaluations so far: seconds, of them extracting features, and their number.
        let mut knn_spent = (0f64, 0f64, 0usize);
        // Training seconds (kNN evaluations excluded) by the end of each epoch: the refits'
        // epoch cost, `budget::epoch_cost`.
        let mut epoch_ends: Vec<f64> = Vec::new();
        let mut summary = Summary::default();
        let started = Instant::now();
        let (mut images, mut waited) = (0usize, 0f64);
        // Rank 0 reports progress to the observer the caller set (the CLI's bar); without one,
        // the logged steps go to `tracing`.
        let mut progress = if writer { self.progress.take() } else { None };
        if let Some(p) = progress.as_mut() {
            p.start(total, self.step);
        }
        let interactive = progress.is_some() || !writer;
        let mut warned_collapse = false;
        while self.epoch < end {
            let epoch = self.epoch;
            if let Some(p) = progress.as_mut() {
                p.epoch(epoch, self.cfg.epochs);
            }
            let t_epoch = Instant::now();
            let (mut loss_sum, mut n_batches, mut ep_images, mut ep_wait) =
                (0f64, 0usize, 0usize, 0f64);
            let mut batches = self.loader.epoch(epoch as u64);
            loop {
                let t_wait = Instant::now();
                let Some(batch) = batches.next() else { break };
                let w = t_wait.elapsed().as_secs_f64();
                ep_wait += w;
                let batch = batch?;
                let t_step = Instant::now();
                let views: Vec<Tensor> = batch
                    .views
                    .iter()
                    .map(|v| v.to_device(&self.device))
                    .collect::<candle_core::Result<_>>()?;
                let labels = match &batch.labels {
                    Some(l) => Some(l.to_device(&self.device)?),
                    None => None,
                };
                let out = self.method.forward_loss(&views, labels.as_ref())?;
                // The mean of the ranks' losses (the same value on every rank), so that every
                // rank stops on the same step.
                // The stop request rides along, so that all ranks abandon the same step.
                let (loss, stop) = {
                    let stop = self
                        .stop
                        .as_ref()
                        .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
                    let mut l = [scalar(&out.loss)?, f64::from(u8::from(stop))];
                    self.comm.all_reduce_sum_f64(&mut l)?;
                    (l[0] / self.comm.world_size() as f64, l[1] > 0.0)
                };
                if stop {
                    return Err(Error::Interrupted {
                        step: self.step,
                        epoch,
                    });
                }
                if !loss.is_finite() {
                    return Err(Error::NonFinite {
                        step: self.step,
                        epoch,
                        value: loss,
                    });
                }
                let mut grads = out.loss.backward()?;
                self.all_reduce_grads(&mut grads)?;
                let lr = lr_at(self.step, total, warmup, self.cfg.lr, self.cfg.min_lr);
                let scale = if self.cfg.clip_grad > 0.0 {
                    let norm = self.optim.grad_norm(&grads)?;
                    if norm > self.cfg.clip_grad {
                        self.cfg.clip_grad / norm
                    } else {
                        1.0
                    }
                } else {
                    1.0
                };
                self.optim.step(&grads, lr, scale)?;
                self.method.after_step(self.step, total)?;
                if !buffers.is_empty() {
                    // Per-rank BatchNorm: running statistics are rank 0's, as PyTorch DDP's
                    // broadcast_buffers makes them.
                    self.broadcast_vars(&buffers)?;
                }
                self.step += 1;
                let n = batch.indices.len() * self.comm.world_size();
                ep_images += n;
                loss_sum += loss;
                n_batches += 1;
                let dt = t_step.elapsed().as_secs_f64() + w;
                if self.step % self.cfg.log_every.max(1) as u64 == 0 || n_batches == 1 {
                    let std = embedding_std(&out.embeddings)?;
                    let mut line = serde_json::json!({
                        "kind": "step", "step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                        "images_per_s": n as f64 / dt, "data_wait": w / dt,
                        "embed_std": std,
                    });
                    for (k, v) in &out.metrics {
                        line[k.as_str()] = serde_json::json!(v);
                    }
                    let d = out.embeddings.dim(D::Minus1)?.max(1) as f64;
                    if std < COLLAPSE_FRACTION / d.sqrt() && !warned_collapse {
                        warned_collapse = true;
                        tracing::warn!(
                            "step {}: embedding std {std:.2e} is below {COLLAPSE_FRACTION}/sqrt(D) = {:.2e}: the embeddings are collapsing to a point",
                            self.step,
                            COLLAPSE_FRACTION / d.sqrt()
                        );
                    }
                    if let Some(metrics) = metrics.as_mut() {
                        writeln!(metrics, "{line}").map_err(|source| Error::Io {
                            path: metrics_path.clone(),
                            source,
                        })?;
                    }
                    if !interactive {
                        tracing::info!(
                            "epoch {} step {} loss {loss:.4} lr {lr:.4} {:.0} img/s",
                            epoch + 1,
                            self.step,
                            n as f64 / dt
                        );
                    }
                }
                if let Some(p) = progress.as_mut() {
                    p.step(self.step, loss);
                }
            }
            drop(batches);
            let wall = t_epoch.elapsed().as_secs_f64();
            let mean_loss = loss_sum / n_batches.max(1) as f64;
            self.epoch += 1;
            // A budgeted run refits its length at every later epoch end, before deciding on
            // this epoch's kNN evaluation, from the costs so far (an epoch: the mean, or the
            // last few epochs' mean when larger): it shortens the run whenever the machine
            // turned slower (the current length no longer fits the budget less half its
            // margin), and lengthens it (up to the configured epochs) whenever the machine
            // turned faster (a longer run fits the budget less its whole margin; the gap
            // between the two keeps the schedule from moving back and forth).
            if fitting {
                epoch_ends.push(started.elapsed().as_secs_f64() - knn_spent.0);
            }
            if fitting && self.epoch > 1 && self.epoch < self.cfg.epochs {
                let elapsed_s = started.elapsed().as_secs_f64();
                let evals = knn_spent.2.max(1) as f64;
                let knn_s = knn_spent.0 / evals;
                let costs = EpochCosts {
                    elapsed_s,
                    epoch_s: crate::budget::epoch_cost(&epoch_ends),
                    knn_s,
                    final_s: self.final_cost(knn_s, knn_spent.1 / evals),
                };
                let fitted = self.decide_length(costs, max_epochs, Some(true), writer)?;
                if fitted != self.cfg.epochs {
                    self.set_length(
                        fitted,
                        max_epochs,
                        costs,
                        writer,
                        &mut metrics,
                        &metrics_path,
                    )?;
                    total = per_epoch * fitted as u64;
                    end = end_at(fitted, first_epoch);
                    if let Some(p) = progress.as_mut() {
                        p.start(total, self.step);
                    }
                }
            }
            let mut recal_s = if self.cfg.bn_recalibrate && self.epoch == self.cfg.epochs {
                let t = Instant::now();
                self.recalibrate_bn()?;
                t.elapsed().as_secs_f64().max(f64::MIN_POSITIVE)
            } else {
                0.0
            };
            let calibrate = fitting && self.epoch == 1;
            // The budget's calibration epoch measures a kNN evaluation too.
            let knn_due = crate::budget::knn_due(self.epoch, self.cfg.epochs, self.cfg.knn_every)
                || (calibrate && self.cfg.knn_every > 0);
            // Every rank extracts its share of the features; rank 0 votes.
            let t_knn = Instant::now();
            let mut knn_res = if knn_due { self.knn_eval()? } else { None };
            let knn_s = if knn_due {
                t_knn.elapsed().as_secs_f64()
            } else {
                0.0
            };
            if knn_due {
                knn_spent = (
                    knn_spent.0 + knn_s,
                    knn_spent.1 + self.knn_extract_s.get().min(knn_s),
                    knn_spent.2 + 1,
                );
            }
            if calibrate {
                let costs = EpochCosts {
                    elapsed_s: started.elapsed().as_secs_f64(),
                    epoch_s: wall,
                    knn_s,
                    final_s: self.final_cost(knn_s, self.knn_extract_s.get().min(knn_s)),
                };
                let fitted = self.decide_length(costs, max_epochs, None, writer)?;
                self.set_length(
                    fitted,
                    max_epochs,
                    costs,
                    writer,
                    &mut metrics,
                    &metrics_path,
                )?;
                total = per_epoch * fitted as u64;
                end = end_at(fitted, first_epoch);
                if let Some(p) = progress.as_mut() {
                    p.start(total, self.step);
                }
                if self.cfg.bn_recalibrate && recal_s == 0.0 && fitted == self.epoch {
                    // The budget ends the run at its calibration epoch: recalibrated now, and
                    // the final evaluation is of the recalibrated encoder.
                    let t = Instant::now();
                    self.recalibrate_bn()?;
                    recal_s = t.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
                    if knn_due {
                        knn_res = self.knn_eval()?;
                    }
                }
            }
            if let Some((t1, _)) = knn_res {
                self.last_knn = Some(t1);
                summary.knn.push((self.epoch, t1));
            }
            let knn_tta = self.knn_tta();
            let line = serde_json::json!({
                "kind": "epoch", "epoch": self.epoch, "step": self.step, "loss": mean_loss,
                "knn_top1": knn_res.map(|r| r.0), "knn_top5": knn_res.map(|r| r.1),
                "knn_flip": knn_res.map(|_| knn_tta >= Tta::Flip),
                "knn_tta": knn_res.map(|_| knn_tta.to_string()),
                "wall_s": wall, "images_per_s": ep_images as f64 / wall, "data_wait": ep_wait / wall,
                "bn_recalibrate_s": (recal_s > 0.0).then_some(recal_s),
            });
            if let Some(metrics) = metrics.as_mut() {
                writeln!(metrics, "{line}").map_err(|source| Error::Io {
                    path: metrics_path.clone(),
                    source,
                })?;
                metrics.flush().map_err(|source| Error::Io {
                    path: metrics_path.clone(),
                    source,
                })?;
            }
            if writer {
                tracing::info!(
                    "epoch {}/{}: loss {mean_loss:.4}{} ({:.0} s, {:.0} img/s, data wait {:.1}%)",
                    self.epoch,
                    self.cfg.epochs,
                    knn_res
                        .map(|r| format!(", kNN top-1 {:.2}%", 100.0 * r.0))
                        .unwrap_or_default(),
                    wall,
                    ep_images as f64 / wall,
                    100.0 * ep_wait / wall
                );
                self.save()?;
            }
            summary.first_loss.get_or_insert(mean_loss);
            summary.last_loss = Some(mean_loss);
            images += ep_images;
            waited += ep_wait;
        }
        if let Some(mut p) = progress {
            p.finish();
            self.progress = Some(p);
        }
        summary.epochs = self.epoch;
        summary.steps = self.step;
        summary.wall_s = started.elapsed().as_secs_f64();
        summary.images_per_s = images as f64 / summary.wall_s.max(1e-9);
        summary.data_wait = waited / summary.wall_s.max(1e-9);
        Ok(summary)
    }
}

/// An observer of a run's progress: the library draws nothing on the terminal; the CLI's
/// progress bar implements this. Every method has a default that does nothing.
pub trait Progress: Send {
    /// `fit` starts: `total` steps in the whole schedule, `done` of them already taken.
    fn start(&mut self, _total: u64, _done: u64) {}
    /// Epoch `epoch` (0-based) of `epochs` begins.
    fn epoch(&mut self, _epoch: usize, _epochs: usize) {}
    /// Step `step` (1-based count of steps taken) finished with `loss`.
    fn step(&mut self, _step: u64, _loss: f64) {}
    /// `fit` returns.
    fn finish(&mut self) {}
}

/// The rows `[start, end)` of `n` that rank `rank` of `world` holds when a dataset is split
/// into contiguous shares (the first `n % world` ranks take one more).
pub fn shard_range(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / world, n % world);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// Every rank's `(n_r, D)` features and labels, in rank order (shares may differ by one row:
/// they are padded for the gather and trimmed after it).
fn gather_features(comm: &Comm, x: &Tensor, labels: &[usize]) -> Result<(Tensor, Vec<usize>)> {
    let world = comm.world_size();
    if world == 1 {
        return Ok((x.clone(), labels.to_vec()));
    }
    let n = x.dim(0)?;
    let counts = selfsup_dist::all_gather_f64(comm.as_ref(), &[n as f64])?;
    let max = counts.iter().fold(0f64, |a, &b| a.max(b)) as usize;
    let pad = |t: Tensor| -> Result<Tensor> {
        Ok(if n < max {
            Tensor::cat(
                &[
                    t.clone(),
                    t.zeros_like()?.narrow(0, 0, 1)?.repeat((max - n, 1))?,
                ],
                0,
            )?
        } else {
            t
        })
    };
    let xs = pad(x.clone())?;
    let ls = Tensor::from_vec(
        labels.iter().map(|&l| l as f64).collect::<Vec<f64>>(),
        (n, 1),
        &Device::Cpu,
    )?;
    let ls = pad(ls)?;
    let gx = selfsup_dist::all_gather_detached(comm, &xs.contiguous()?)?;
    let gl = selfsup_dist::all_gather_detached(comm, &ls.contiguous()?)?;
    let (mut parts, mut lab) = (Vec::new(), Vec::new());
    for (r, &c) in counts.iter().enumerate() {
        let c = c as usize;
        parts.push(gx.narrow(0, r * max, c)?);
        lab.extend(
            gl.narrow(0, r * max, c)?
                .flatten_all()?
                .to_vec1::<f64>()?
                .into_iter()
                .map(|v| v as usize),
        );
    }
    Ok((Tensor::cat(&parts, 0)?, lab))
}

/// Average the gradients of `params` over the ranks of `comm`: one all-reduce of one flat `f32`
/// buffer (parameters in the given order, the same on every rank: the optimiser's, sorted by
/// name). A parameter without a gradient has none on any rank (the same graph runs everywhere)
/// and is left out. One rank: nothing to do.
pub fn all_reduce_gradients(
    comm: &dyn selfsup_dist::Communicator,
    params: &[Param],
    grads: &mut candle_core::backprop::GradStore,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // One flat buffer of every gradient (one copy each), averaged in place, then cut back
    // into views of it.
    let mut buf: Vec<f32> = Vec::new();
    let mut have = Vec::new();
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g = g.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let (storage, layout) = g.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(cpu), Some((a, b))) => {
                    buf.extend_from_slice(&cpu.as_slice::<f32>()?[a..b])
                }
                _ => {
                    drop(storage);
                    buf.extend(g.flatten_all()?.to_vec1::<f32>()?)
                }
            }
            have.push(p.var.as_tensor().clone());
        }
    }
    if have.is_empty() {
        return Ok(());
    }
    selfsup_dist::all_reduce_mean_f32(comm, &mut buf)?;
    let len = buf.len();
    let flat = Tensor::from_vec(buf, len, &Device::Cpu)?;
    let mut at = 0;
    for var in have {
        let n = var.elem_count();
        let g = flat
            .narrow(0, at, n)?
            .reshape(var.shape())?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        grads.insert(&var, g);
        at += n;
    }
    Ok(())
}

/// Drop metric lines from after the checkpoint a run resumes from.
fn truncate_metrics(path: &Path, step: u64, epoch: usize) -> Result<()> {
    let Ok(s) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = s
        .lines()
        .filter(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) => match v["kind"].as_str() {
                Some("step") => v["step"].as_u64().is_some_and(|s| s <= step),
                Some("epoch") => v["epoch"].as_u64().is_some_and(|e| e as usize <= epoch),
                _ => true,
            },
            Err(_) => false,
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(crate::write_atomic(path, out.as_bytes())?)
}
