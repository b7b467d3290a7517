//! # selfsup-data
//!
//! Data for self-supervised learning, with no knowledge of models: datasets yield `u8` CHW
//! images, seeded transforms augment them, and a [`Loader`] turns them into batches of views
//! (candle `Tensor`s).
//!
//! Design choice: images stay `u8` until the last step ([`Normalize`]), and every random
//! decision is drawn from a generator derived from `(seed, epoch, index, view)`
//! ([`item_rng`]), never from thread-local state. This makes batches byte-identical for a
//! seed whatever the number of worker threads, and lets a resumed run replay an epoch exactly.
//!
//! - [`Dataset`]: `len` and `get(i)`; [`cifar`] (official binary layout) and [`folder`]
//!   (`root/<class>/*.png` or flat) produce [`InMemory`] datasets.
//! - [`transforms`]: one file per transform, torchvision `transforms.v2` semantics.
//! - [`Pipeline`], [`MultiView`], [`Preset`]: views per image.
//! - [`Loader`]: parallel, prefetching, seeded batches.
//! - `download` (feature `download`): fetch, verify and extract CIFAR-10.
#![warn(missing_docs)]

pub mod cifar;
mod dataset;
#[cfg(feature = "download")]
pub mod download;
mod error;
pub mod fingerprint;
pub mod folder;
mod image;
mod loader;
mod pipeline;
pub mod synthetic;
pub mod transforms;

pub use dataset::{Dataset, InMemory, Item};
pub use error::{Error, Result};
pub use image::Image;
pub use loader::{Batch, Batches, Loader, LoaderConfig};
pub use pipeline::{
    item_rng, mix_seed, preset_local_view, preset_views, preset_views_multicrop, LocalCrops,
    MultiView, Pipeline, Preset, DEFAULT_MIN_SCALE, MAX_JITTER_SCALE,
};
pub use transforms::{Normalize, Rng, Transform};
