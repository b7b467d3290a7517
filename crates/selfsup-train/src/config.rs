//! The run configuration: every option of `selfsup train`, as TOML.

use serde::{Deserialize, Serialize};

use crate::optim::OptimizerKind;
use crate::{Error, Result};

/// Everything that defines a training run. Unknown keys in a TOML file are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Method name (`simclr`).
    pub method: String,
    /// Encoder name (`small-cnn`, `resnet18`, `resnet18-imagenet`, ...).
    pub encoder: String,
    /// `cifar10` or `folder:PATH` (unlabelled or `root/<class>/` folders).
    pub dataset: String,
    /// Where CIFAR-10 lives or is downloaded to.
    pub data_dir: String,
    /// CIFAR-10 source for the automatic download (URL or path); empty: `$SELFSUP_CIFAR10_SOURCE`
    /// or the official URL.
    pub source: String,
    /// Expected sha256 of `source` (empty: the official digest for the official URL).
    pub sha256: String,
    /// Use only the first N training images (0: all), for quick runs.
    pub train_subset: usize,
    /// Image side (32 for CIFAR-10).
    pub image_size: usize,
    /// Side of the global training views (0: `image_size`). Smaller views train faster; the
    /// kNN monitor and every evaluation still see whole images at `image_size`.
    pub crop_size: usize,
    /// Augmentation preset (`simclr_cifar`, `simclr_imagenet`, `byol`).
    pub augment: String,
    /// Epochs.
    pub epochs: usize,
    /// Images per batch (each gives two views).
    pub batch_size: usize,
    /// Base learning rate (after warmup).
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Warmup epochs (linear).
    pub warmup_epochs: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Momentum (SGD, LARS) or beta1 (AdamW).
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (not on biases and norm parameters).
    pub weight_decay: f64,
    /// LARS trust coefficient.
    pub lars_eta: f64,
    /// Learning-rate multiplier for biases and norm parameters (those without weight decay).
    pub bias_lr_scale: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip_grad: f64,
    /// Projection head hidden width.
    pub proj_hidden: usize,
    /// Projection output width.
    pub proj_out: usize,
    /// Loss temperature.
    pub temperature: f64,
    /// Predictor hidden width (BYOL, SimSiam).
    pub pred_hidden: usize,
    /// Momentum of the target network (MoCo, BYOL) at the start of the run.
    pub momentum_tau: f64,
    /// Cosine schedule of the target momentum from `momentum_tau` to 1 (BYOL).
    pub momentum_cosine: bool,
    /// MoCo's queue of negative keys.
    pub queue_size: usize,
    /// MoCo: symmetric loss over both views.
    pub symmetric: bool,
    /// Weight of the pretext task in a hybrid (`simclr+rotation`).
    pub aux_weight: f64,
    /// `pairs`: `margin` (Hadsell et al. 2006) or `triplet`.
    pub pair_loss: String,
    /// `pairs`: the margin.
    pub margin: f64,
    /// `pairs`: positives and negatives from labels (supervised) as well as augmentation.
    pub pair_labels: bool,
    /// `colorization`: `bins` / `bins:Q` (cross-entropy over Q = 16 bins per channel, the
    /// default: Zhang et al.'s classification view) or `regression` (ab, MSE).
    pub color_target: String,
    /// Seed for weights, order and augmentations.
    pub seed: u64,
    /// Worker threads for data and compute (0: one per core; with several ranks on a node, the
    /// node's cores shared by its ranks).
    pub threads: usize,
    /// Data-parallel ranks as threads of this one process (1: none). Each rank trains on
    /// `batch_size / ranks` images of every global batch with its own `threads`, exactly as
    /// `mpirun -np ranks` would (the same collectives over shared memory); under an MPI
    /// launcher each process is one rank and this must be 1. 0: automatic, one rank per
    /// `threads` cores of this machine ([`TrainConfig::local_ranks`]); it needs `sync_bn`, so
    /// that what the run learns does not depend on the machine's core count.
    pub ranks: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Run folder.
    pub out: String,
    /// kNN monitor every N epochs (0: never).
    pub knn_every: usize,
    /// kNN monitor: features averaged over each image and its mirror image (test-time flip).
    pub knn_flip: bool,
    /// Test-time augmentation of the final kNN evaluation (after the last epoch, the one of
    /// the run's record): `none`, `flip` or `flip-shift` ([`selfsup_eval::Tta`]); the periodic
    /// evaluations stay plain (or flip-averaged with `knn_flip`), so the monitor stays cheap,
    /// and the result is that of `selfsup eval knn --tta <this>`. The final evaluation takes
    /// the richer of this and the monitor's. Configs written before this option, with
    /// `knn_final_flip = true / false`, read as `flip` / `none`.
    #[serde(alias = "knn_final_flip", deserialize_with = "tta_or_bool")]
    pub knn_final_tta: String,
    /// kNN neighbours.
    pub knn_k: usize,
    /// kNN vote temperature.
    pub knn_temperature: f64,
    /// Test images for the kNN monitor (0: all).
    pub knn_test_subset: usize,
    /// After the last epoch, before the final kNN evaluation and checkpoint: re-estimate the
    /// encoder's BatchNorm running statistics on whole, unaugmented training images (precise
    /// BatchNorm, [`selfsup_eval::recalibrate_batch_norm`]), so that eval mode normalises with
    /// the statistics of the images it is given rather than of the last steps' crops. Only
    /// the buffers change; a time budget counts its cost.
    pub bn_recalibrate: bool,
    /// Start the encoder's first convolution (`encoder.conv1.weight`) from patch-whitening
    /// filters of the training images instead of random ones ([`crate::whiten`]); a fresh
    /// run only, the filters then train like every weight.
    pub patch_whitening: bool,
    /// Log a metrics line every N steps.
    pub log_every: usize,
    /// Wall-clock budget of a fresh run in seconds (0: off): after the first epoch the run
    /// fits its number of epochs, at most `epochs`, to end inside the budget, and refits it
    /// after every later epoch (see [`crate::budget`]).
    pub time_budget_s: f64,
    /// Smallest area of a global view's random resized crop, as a fraction of the image (the
    /// two-view augmentation presets; SimCLR's 0.08).
    pub crop_min_scale: f64,
    /// Colour jitter of the augmentation preset's views, its four strengths (brightness,
    /// contrast, saturation, hue) times this factor: 1 the preset's own, 0 none, at most
    /// [`selfsup_data::MAX_JITTER_SCALE`]. Its probability is the preset's.
    pub jitter_scale: f64,
    /// Multi-crop: local views per image besides the two global views (0: off). Methods whose
    /// loss compares projections (simclr, barlow, vicreg) take them.
    pub local_crops: usize,
    /// Side of a local view in pixels.
    pub local_crop_size: usize,
    /// Smallest area of a local crop, as a fraction of the image.
    pub local_crop_min_scale: f64,
    /// Largest area of a local crop, as a fraction of the image.
    pub local_crop_max_scale: f64,
    /// Data-parallel runs: BatchNorm statistics over the global batch (every rank's samples),
    /// forward and backward. Without it each rank normalises its own batch and the running
    /// statistics are rank 0's, as in PyTorch DDP. No effect in one process.
    pub sync_bn: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: "simclr".into(),
            encoder: "small-cnn".into(),
            dataset: "cifar10".into(),
            data_dir: "data".into(),
            source: String::new(),
            sha256: String::new(),
            train_subset: 0,
            image_size: 32,
            crop_size: 0,
            augment: "simclr_cifar".into(),
            epochs: 10,
            batch_size: 256,
            lr: 0.06,
            min_lr: 0.0,
            warmup_epochs: 1.0,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            lars_eta: 0.02,
            bias_lr_scale: 1.0,
            clip_grad: 0.0,
            proj_hidden: 512,
            proj_out: 128,
            temperature: 0.5,
            pred_hidden: 512,
            momentum_tau: 0.99,
            momentum_cosine: false,
            queue_size: 4096,
            symmetric: false,
            aux_weight: 0.5,
            pair_loss: "margin".into(),
            margin: 1.0,
            pair_labels: false,
            color_target: "bins".into(),
            seed: 0,
            threads: 0,
            ranks: 1,
            device: "cpu".into(),
            out: "runs/simclr".into(),
            knn_every: 1,
            knn_flip: false,
            knn_final_tta: "none".into(),
            knn_k: 200,
            knn_temperature: 0.1,
            knn_test_subset: 0,
            bn_recalibrate: false,
            patch_whitening: false,
            log_every: 20,
            time_budget_s: 0.0,
            crop_min_scale: selfsup_data::DEFAULT_MIN_SCALE,
            jitter_scale: 1.0,
            local_crops: 0,
            local_crop_size: 16,
            local_crop_min_scale: 0.1,
            local_crop_max_scale: 0.4,
            sync_bn: false,
        }
    }
}

impl TrainConfig {
    /// The ranks this process runs as threads: `ranks`, or for `ranks = 0` one rank per
    /// `threads` of the machine's `cores` (one per core with `threads = 0`), the most up to
    /// that count that divide the batch; 1 when `under_launcher` (an MPI launcher started this
    /// process as one rank of its own).
    pub fn local_ranks(&self, cores: usize, under_launcher: bool) -> usize {
        if self.ranks != 0 {
            return self.ranks;
        }
        if under_launcher {
            return 1;
        }
        let mut r = (cores / self.threads.max(1)).clamp(1, 1024);
        while r > 1 && self.batch_size % r != 0 {
            r -= 1;
        }
        r
    }

    /// Parse TOML (unknown keys are errors that name the key).
    pub fn from_toml(s: &str) -> Result<Self> {
        toml::from_str(s)
            .map_err(|e| Error::Config(format!("bad config: {}", e.to_string().trim())))
    }

    /// The test-time augmentation of the kNN monitor's periodic evaluations.
    pub fn monitor_tta(&self) -> selfsup_eval::Tta {
        if self.knn_flip {
            selfsup_eval::Tta::Flip
        } else {
            selfsup_eval::Tta::None
        }
    }

    /// The test-time augmentation of the final kNN evaluation: the richer of `knn_final_tta`
    /// and the monitor's (an unparsable `knn_final_tta`, which [`Self::validate`] rejects,
    /// counts as none).
    pub fn final_tta(&self) -> selfsup_eval::Tta {
        let fin = self.knn_final_tta.parse().unwrap_or_default();
        self.monitor_tta().max(fin)
    }

    /// As TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    /// Set the method-specific options (loss temperature, head widths, momentum, augmentation;
    /// for Barlow Twins and VICReg also the optimiser: LARS, lr 0.2 x batch / 256) to
    /// `method`'s defaults, from its paper or lightly's CIFAR-10 benchmark (docs/methods.md).
    /// The CLI applies them after the preset and before the config file and the flags. For a
    /// hybrid `a+b` these are `a`'s, with `b`'s pretext defaults.
    pub fn apply_method_defaults(&mut self, method: &str) {
        let d = Self::default();
        let (base, aux) = match method.split_once('+') {
            Some((a, b)) => (a, Some(b)),
            None => (method, None),
        };
        self.method = method.to_string();
        self.temperature = d.temperature;
        self.proj_hidden = d.proj_hidden;
        self.proj_out = d.proj_out;
        self.pred_hidden = d.pred_hidden;
        self.momentum_tau = d.momentum_tau;
        self.momentum_cosine = d.momentum_cosine;
        self.queue_size = d.queue_size;
        self.symmetric = d.symmetric;
        self.augment = d.augment.clone();
        match base {
            "moco" => self.temperature = 0.1,
            "supcon" => self.temperature = 0.1,
            "byol" => {
                (self.proj_hidden, self.proj_out, self.pred_hidden) = (1024, 256, 1024);
                self.momentum_cosine = true;
            }
            "simsiam" => (self.proj_hidden, self.proj_out, self.pred_hidden) = (2048, 2048, 512),
            "barlow" | "vicreg" => {
                (self.proj_hidden, self.proj_out) = (2048, 2048);
                // Both papers train with LARS at a base lr of 0.2 per 256 images (weight decay
                // 1.5e-6 for Barlow Twins, 1e-6 for VICReg); with SGD at SimCLR's rate VICReg
                // diverges and Barlow Twins stalls (docs/methods.md).
                self.optimizer = OptimizerKind::Lars;
                self.lr = Self::lars_base_lr() * self.batch_size as f64 / 256.0;
                self.weight_decay = if base == "barlow" { 1.5e-6 } else { 1e-6 };
            }
            "rotation" | "colorization" | "supervised" => self.augment = "crop_flip".into(),
            _ => {}
        }
        if aux.is_some() {
            self.aux_weight = d.aux_weight;
        }
    }

    /// Barlow Twins' and VICReg's base learning rate per 256 images (both papers, with LARS).
    pub fn lars_base_lr() -> f64 {
        0.2
    }

    /// For a method whose default learning rate scales with the batch (Barlow Twins, VICReg):
    /// `lr`, chosen for `batch` images (the method's default or a preset's), scaled to the
    /// current `batch_size`. Called when the batch size was chosen after the method's defaults
    /// and the preset (a flag or a config file) and no learning rate was given.
    pub fn rescale_default_lr(&mut self, lr: f64, batch: usize) {
        let base = self.method.split('+').next().unwrap_or_default();
        if matches!(base, "barlow" | "vicreg") && batch > 0 {
            self.lr = lr * self.batch_size as f64 / batch as f64;
        }
    }

    /// Methods that take local views (multi-crop) besides the two global views.
    pub const MULTI_CROP_METHODS: [&'static str; 3] = ["simclr", "barlow", "vicreg"];

    /// The side of the global training views: `crop_size`, or `image_size` when 0.
    pub fn global_view_size(&self) -> usize {
        if self.crop_size == 0 {
            self.image_size
        } else {
            self.crop_size
        }
    }

    /// The multi-crop settings for the data pipeline.
    pub fn local_crops_config(&self) -> selfsup_data::LocalCrops {
        selfsup_data::LocalCrops {
            count: self.local_crops,
            size: self.local_crop_size,
            scale: (self.local_crop_min_scale, self.local_crop_max_scale),
        }
    }

    /// Check values that would fail later.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.epochs == 0 {
            return bad("epochs must be positive".into());
        }
        if self.ranks > 1024 {
            return bad(format!(
                "ranks must be 1 to 1024 (0: one per core), got {}",
                self.ranks
            ));
        }
        if self.ranks == 0 && !self.sync_bn {
            return bad(
                "ranks = 0 (one rank per core) needs sync_bn, or the recipe would depend on the machine's core count"
                    .into(),
            );
        }
        if self.ranks > 1 && self.batch_size % self.ranks != 0 {
            return bad(format!(
                "batch size {} is the global batch and must be a multiple of the {} ranks",
                self.batch_size, self.ranks
            ));
        }
        if self.batch_size < 2 {
            return bad(format!(
                "batch size must be at least 2, got {}",
                self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be positive, got {}",
                self.temperature
            ));
        }
        if self.warmup_epochs < 0.0 || !self.warmup_epochs.is_finite() {
            return bad(format!(
                "warmup_epochs must be >= 0, got {}",
                self.warmup_epochs
            ));
        }
        if !(self.momentum_tau.is_finite() && (0.0..=1.0).contains(&self.momentum_tau)) {
            return bad(format!(
                "momentum_tau must be in [0, 1], got {}",
                self.momentum_tau
            ));
        }
        if !(self.aux_weight.is_finite() && self.aux_weight >= 0.0) {
            return bad(format!("aux_weight must be >= 0, got {}", self.aux_weight));
        }
        if !(self.margin.is_finite() && self.margin > 0.0) {
            return bad(format!("margin must be positive, got {}", self.margin));
        }
        if self.method.starts_with("moco") && self.queue_size < self.batch_size {
            return bad(format!(
                "queue_size ({}) must hold at least one batch ({})",
                self.queue_size, self.batch_size
            ));
        }
        if self.out.is_empty() {
            return bad("out (the run folder) must be set".into());
        }
        if self.image_size == 0 {
            return bad("image_size must be positive".into());
        }
        if self.local_crops > 0 {
            let base = self.method.split('+').next().unwrap_or_default();
            if !Self::MULTI_CROP_METHODS.contains(&base) {
                return bad(format!(
                    "local_crops: {} takes exactly two views (set --local-crops 0); multi-crop works with {}",
                    self.method,
                    Self::MULTI_CROP_METHODS.join(", ")
                ));
            }
            self.local_crops_config()
                .validate()
                .map_err(|e| Error::Config(format!("local crops: {e}")))?;
        }
        if !(self.time_budget_s.is_finite() && self.time_budget_s >= 0.0) {
            return bad(format!(
                "time_budget_s must be a number of seconds >= 0 (0: off), got {}",
                self.time_budget_s
            ));
        }
        if !(self.crop_min_scale > 0.0 && self.crop_min_scale <= 1.0) {
            return bad(format!(
                "crop_min_scale must satisfy 0 < scale <= 1, got {}",
                self.crop_min_scale
            ));
        }
        if !(0.0..=selfsup_data::MAX_JITTER_SCALE).contains(&self.jitter_scale) {
            return bad(format!(
                "jitter_scale must be in 0..={}, got {}",
                selfsup_data::MAX_JITTER_SCALE,
                self.jitter_scale
            ));
        }
        self.knn_final_tta
            .parse::<selfsup_eval::Tta>()
            .map_err(|e| Error::Config(format!("knn_final_tta: {e}")))?;
        // The kNN monitor's settings fail here, not after the first epoch.
        if self.knn_every > 0 {
            selfsup_eval::KnnConfig {
                k: self.knn_k,
                temperature: self.knn_temperature,
            }
            .validate()
            .map_err(|e| Error::Config(format!("knn_k / knn_temperature: {e}")))?;
        }
        Ok(())
    }
}

/// `knn_final_tta` as a name, or as the boolean of the older `knn_final_flip`.
fn tta_or_bool<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrBool {
        Name(String),
        Bool(bool),
    }
    Ok(match NameOrBool::deserialize(d)? {
        NameOrBool::Name(s) => s,
        NameOrBool::Bool(true) => "flip".into(),
        NameOrBool::Bool(false) => "none".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_evaluations_augmentation_reads_old_and_new_configs() {
        let old = TrainConfig::from_toml("knn_final_flip = true").unwrap();
        assert_eq!(old.knn_final_tta, "flip");
        assert_eq!(old.final_tta(), selfsup_eval::Tta::Flip);
        let off = TrainConfig::from_toml("knn_final_flip = false").unwrap();
        assert_eq!(off.final_tta(), selfsup_eval::Tta::None);
        let new = TrainConfig::from_toml("knn_final_tta = \"flip-shift\"").unwrap();
        assert_eq!(new.final_tta(), selfsup_eval::Tta::FlipShift);
        new.validate().unwrap();
        // The monitor's flip raises a plainer final evaluation to its own.
        let monitor_flip = TrainConfig::from_toml("knn_flip = true").unwrap();
        assert_eq!(monitor_flip.final_tta(), selfsup_eval::Tta::Flip);
        // Written back, a config keeps the new name only.
        let toml = old.to_toml();
        assert!(toml.contains("knn_final_tta = \"flip\""), "{toml}");
        assert!(!toml.contains("knn_final_flip"), "{toml}");
        let bad = TrainConfig {
            knn_final_tta: "rotate".into(),
            ..TrainConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("knn_final_tta") && e.contains("flip-shift"),
            "{e}"
        );
    }

    #[test]
    fn automatic_ranks_take_every_core_that_divides_the_batch() {
        let auto = TrainConfig {
            ranks: 0,
            sync_bn: true,
            batch_size: 256,
            ..TrainConfig::default()
        };
        auto.validate().unwrap();
        assert_eq!(auto.local_ranks(2, false), 2);
        assert_eq!(auto.local_ranks(1, false), 1);
        assert_eq!(auto.local_ranks(16, false), 16);
        // 12 cores: 12 does not divide 256, 8 is the most that does.
        assert_eq!(auto.local_ranks(12, false), 8);
        // Two threads per rank: half the cores.
        let two = TrainConfig {
            threads: 2,
            ..auto.clone()
        };
        assert_eq!(two.local_ranks(8, false), 4);
        assert_eq!(two.local_ranks(3, false), 1);
        // Under mpirun every process is one rank already.
        assert_eq!(auto.local_ranks(16, true), 1);
        // An explicit count stays as it is.
        let three = TrainConfig {
            ranks: 3,
            batch_size: 255,
            ..auto.clone()
        };
        assert_eq!(three.local_ranks(2, false), 3);
        // Automatic ranks without synchronised BatchNorm would change the recipe per machine.
        let unsynced = TrainConfig {
            sync_bn: false,
            ..auto
        };
        let e = unsynced.validate().unwrap_err().to_string();
        assert!(e.contains("needs sync_bn"), "{e}");
    }
}
