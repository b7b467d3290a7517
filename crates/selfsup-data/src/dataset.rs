//! The `Dataset` trait: random access to images and optional labels.

use crate::{Image, Result};

/// One dataset item.
#[derive(Clone, Debug)]
pub struct Item {
    /// The image, u8 CHW.
    pub image: Image,
    /// Class index, when the dataset has labels.
    pub label: Option<usize>,
}

/// Random access to a fixed set of images. Implementations must be cheap to call from many
/// threads at once (the loader does).
///
/// Data never sees the model: a dataset yields raw `u8` images; augmentation and batching are
/// separate steps ([`crate::Pipeline`], [`crate::Loader`]).
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether the dataset is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Item `i` (`0 <= i < len`).
    fn get(&self, i: usize) -> Result<Item>;
    /// Class names, when labelled.
    fn classes(&self) -> Option<&[String]> {
        None
    }
}

impl<D: Dataset + ?Sized> Dataset for std::sync::Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, i: usize) -> Result<Item> {
        (**self).get(i)
    }
    fn classes(&self) -> Option<&[String]> {
        (**self).classes()
    }
}

/// A dataset held in memory as one contiguous buffer of equally sized u8 CHW images.
#[derive(Clone, Debug)]
pub struct InMemory {
    /// All pixel bytes, image after image.
    pub pixels: Vec<u8>,
    /// One label per image, if labelled.
    pub labels: Option<Vec<u8>>,
    /// Class names (empty when unlabelled).
    pub class_names: Vec<String>,
    /// Channels per image.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl InMemory {
    fn item_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Keep only the items at `indices` (in that order).
    pub fn subset(&self, indices: &[usize]) -> Self {
        let n = self.item_len();
        let mut pixels = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
        }
        Self {
            pixels,
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            class_names: self.class_names.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// Labels as `usize`, if any.
    pub fn label_vec(&self) -> Option<Vec<usize>> {
        self.labels
            .as_ref()
            .map(|l| l.iter().map(|&x| x as usize).collect())
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.pixels.len() / self.item_len().max(1)
    }

    fn get(&self, i: usize) -> Result<Item> {
        let len = self.len();
        if i >= len {
            return Err(crate::Error::OutOfRange { index: i, len });
        }
        let n = self.item_len();
        Ok(Item {
            image: Image::new(
                self.pixels[i * n..(i + 1) * n].to_vec(),
                self.channels,
                self.height,
                self.width,
            ),
            label: self.labels.as_ref().map(|l| l[i] as usize),
        })
    }

    fn classes(&self) -> Option<&[String]> {
        if self.labels.is_some() {
            Some(&self.class_names)
        } else {
            None
        }
    }
}
