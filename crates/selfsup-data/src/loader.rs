//! Batches of augmented views as candle tensors, built in parallel (rayon) and prefetched on a
//! background thread.
//!
//! Every random choice comes from [`crate::item_rng`]`(seed, epoch, index, view)`, so the
//! same seed gives byte-identical batches whatever the number of threads, and the epoch order is
//! a seeded shuffle: a run resumed at epoch `k` sees exactly the batches it would have seen.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::pipeline::{item_rng, mix_seed};
use crate::transforms::Rng;
use crate::{Dataset, Error, MultiView, Result};

/// How to batch a dataset.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle each epoch (seeded by `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Seed for the order and every augmentation.
    pub seed: u64,
    /// Worker threads for augmentation (0: rayon's default, one per core).
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Data-parallel shard `(rank, world)`: each batch of `batch_size` (the global batch) is
    /// split into `world` equal consecutive parts and this loader yields part `rank`. The
    /// epoch order and every augmentation are the same for any `world`. `(0, 1)`: everything.
    pub shard: (usize, usize),
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            shuffle: true,
            drop_last: true,
            seed: 0,
            threads: 0,
            prefetch: 2,
            shard: (0, 1),
        }
    }
}

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// One `(N, C, H, W)` `f32` tensor per view, on the CPU.
    pub views: Vec<Tensor>,
    /// `(N,)` `u32` labels, when the dataset has them.
    pub labels: Option<Tensor>,
    /// Dataset indices of the batch's images.
    pub indices: Vec<usize>,
}

struct Inner {
    dataset: Arc<dyn Dataset>,
    views: MultiView,
    cfg: LoaderConfig,
    pool: Option<rayon::ThreadPool>,
}

/// A seeded, parallel, prefetching batch loader.
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("len", &self.inner.dataset.len())
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Loader {
    /// The loader every evaluation reads features through: each image once, in order, no
    /// augmentation (resized to `size` and normalised with `normalize`), batches of 512.
    pub fn for_eval(
        dataset: Arc<dyn Dataset>,
        size: usize,
        normalize: crate::Normalize,
        threads: usize,
    ) -> Result<Self> {
        let cfg = LoaderConfig {
            batch_size: 512,
            shuffle: false,
            drop_last: false,
            seed: 0,
            threads,
            prefetch: 2,
            shard: (0, 1),
        };
        Self::new(
            dataset,
            crate::preset_views(crate::Preset::None, size, normalize),
            cfg,
        )
    }

    /// A loader over `dataset` producing the views of `views`.
    pub fn new(dataset: Arc<dyn Dataset>, views: MultiView, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::Config("batch size must be positive".into()));
        }
        if views.is_empty() {
            return Err(Error::Config("at least one view is needed".into()));
        }
        let (rank, world) = cfg.shard;
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "shard {rank} of {world} does not exist"
            )));
        }
        if world > 1 && (!cfg.drop_last || cfg.batch_size % world != 0) {
            return Err(Error::Config(format!(
                "batch size {} must be a multiple of the {world} ranks (each rank takes batch / ranks images) and drop_last set",
                cfg.batch_size
            )));
        }
        if dataset.is_empty() {
            return Err(Error::Config("the dataset is empty".into()));
        }
        if cfg.drop_last && dataset.len() < cfg.batch_size {
            return Err(Error::Config(format!(
                "batch size {} is larger than the dataset ({} images) and drop_last is set",
                cfg.batch_size,
                dataset.len()
            )));
        }
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .thread_name(|i| format!("selfsup-data-{i}"))
                    .build()
                    .map_err(|e| Error::Config(format!("cannot start worker threads: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dataset,
                views,
                cfg,
                pool,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.inner.dataset
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.inner.dataset.len(), self.inner.cfg.batch_size);
        if self.inner.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The item order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.inner.dataset.len()).collect();
        if self.inner.cfg.shuffle {
            let mut rng = Rng::seed_from_u64(mix_seed(self.inner.cfg.seed, &[u64::MAX, epoch]));
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// Build one batch from dataset indices, synchronously (in parallel on the loader's threads).
    pub fn build(&self, epoch: u64, indices: &[usize]) -> Result<Batch> {
        self.inner.build(epoch, indices)
    }

    /// The batches of `epoch`, prepared ahead on a background thread.
    pub fn epoch(&self, epoch: u64) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` starting at batch `start` (for resuming inside an epoch).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Batches {
        let order = self.order(epoch);
        let b = self.inner.cfg.batch_size;
        let nb = self.num_batches();
        let (tx, rx) = sync_channel(self.inner.cfg.prefetch.max(1));
        let inner = self.inner.clone();
        let handle = std::thread::Builder::new()
            .name("selfsup-prefetch".into())
            .spawn(move || {
                let (rank, world) = inner.cfg.shard;
                let part = b / world;
                for bi in start..nb {
                    let (lo, hi) = if world > 1 {
                        (bi * b + rank * part, bi * b + (rank + 1) * part)
                    } else {
                        (bi * b, ((bi + 1) * b).min(order.len()))
                    };
                    let batch = inner.build(epoch, &order[lo..hi]);
                    let stop = batch.is_err();
                    if tx.send(batch).is_err() || stop {
                        break;
                    }
                }
            })
            .expect("spawn prefetch thread");
        Batches {
            rx,
            handle: Some(handle),
            remaining: nb.saturating_sub(start),
        }
    }
}

impl Inner {
    fn build(&self, epoch: u64, indices: &[usize]) -> Result<Batch> {
        let nv = self.views.len();
        let seed = self.cfg.seed;
        type ItemViews = (Vec<(Vec<f32>, (usize, usize, usize))>, Option<usize>);
        let work = || -> Result<Vec<ItemViews>> {
            indices
                .par_iter()
                .map(|&i| {
                    let item = self.dataset.get(i)?;
                    let mut outs = Vec::with_capacity(nv);
                    for (v, p) in self.views.views.iter().enumerate() {
                        let mut rng = item_rng(seed, epoch, i as u64, v as u64);
                        let mut buf = Vec::new();
                        let shape = p.apply_into(item.image.clone(), &mut rng, &mut buf);
                        outs.push((buf, shape));
                    }
                    Ok((outs, item.label))
                })
                .collect()
        };
        let items = match &self.pool {
            Some(p) => p.install(work)?,
            None => work()?,
        };
        let n = items.len();
        let mut views = Vec::with_capacity(nv);
        for v in 0..nv {
            let (c, h, w) = items[0].0[v].1;
            let mut data = Vec::with_capacity(n * c * h * w);
            for (outs, _) in &items {
                let (buf, s) = &outs[v];
                if *s != (c, h, w) {
                    return Err(Error::Config(format!(
                        "images of view {v} in one batch have different shapes ({:?} and {s:?}); add a crop or resize",
                        (c, h, w)
                    )));
                }
                data.extend_from_slice(buf);
            }
            views.push(Tensor::from_vec(data, (n, c, h, w), &Device::Cpu)?);
        }
        let labels = if items.iter().all(|x| x.1.is_some()) {
            let l: Vec<u32> = items.iter().map(|x| x.1.unwrap() as u32).collect();
            Some(Tensor::from_vec(l, n, &Device::Cpu)?)
        } else {
            None
        };
        Ok(Batch {
            views,
            labels,
            indices: indices.to_vec(),
        })
    }
}

/// Iterator over the prefetched batches of one epoch.
pub struct Batches {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Iterator for Batches {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        match self.rx.recv() {
            Ok(b) => {
                self.remaining -= 1;
                if b.is_err() {
                    self.remaining = 0;
                }
                Some(b)
            }
            Err(_) => {
                // The prefetch thread stopped (a panic) before sending every batch: the epoch
                // fails, it is not short.
                let left = self.remaining;
                self.remaining = 0;
                Some(Err(Error::Config(format!(
                    "the data loader's prefetch thread stopped with {left} batches of the epoch left"
                ))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Unblock the producer (its next send fails), then wait for it.
        let (_tx, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
