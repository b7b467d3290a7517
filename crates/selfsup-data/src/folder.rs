//! Folders of images: `root/<class>/*.{png,jpg,jpeg}` (labelled, labels from the sorted folder
//! names) or a flat `root/*.{png,jpg,jpeg}` (unlabelled).
//!
//! Images are decoded once, in parallel, resized so the shorter side equals the requested size
//! (bilinear) and centre-cropped to a square, then kept in memory as `u8` CHW.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::IoContext;
use crate::{Error, Image, InMemory, Result};

/// How to read an image folder.
#[derive(Clone, Debug)]
pub struct FolderOptions {
    /// Output side length (images become `size x size`).
    pub size: usize,
    /// `true`: one sub-folder per class; `false`: a flat folder of unlabelled images.
    pub labelled: bool,
    /// Skip unreadable files with a counted warning instead of failing.
    pub skip_bad: bool,
}

/// The result of reading a folder.
#[derive(Debug)]
pub struct Folder {
    /// The images (and labels, if labelled).
    pub data: InMemory,
    /// Files that were skipped because they could not be decoded (only with `skip_bad`).
    pub skipped: Vec<PathBuf>,
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).at(dir)? {
        let p = e.at(dir)?.path();
        if p.is_file() && is_image(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Decode one file and bring it to `size x size`: shorter side resized to `size` (bilinear),
/// then a centre crop.
pub fn load_image(path: &Path, size: usize) -> Result<Image> {
    let img = image::open(path).map_err(|e| Error::Decode {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let rgb = img.to_rgb8();
    Ok(Image::from_rgb(&resize_center_crop(&rgb, size)))
}

fn resize_center_crop(rgb: &image::RgbImage, size: usize) -> image::RgbImage {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let short = w.min(h);
    let resized = if short == size {
        rgb.clone()
    } else {
        let (nw, nh) = if w <= h {
            (size, ((h * size) as f64 / w as f64).round() as usize)
        } else {
            (((w * size) as f64 / h as f64).round() as usize, size)
        };
        image::imageops::resize(
            rgb,
            nw.max(size) as u32,
            nh.max(size) as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let (rw, rh) = (resized.width() as usize, resized.height() as usize);
    let x = (rw - size) / 2;
    let y = (rh - size) / 2;
    image::imageops::crop_imm(&resized, x as u32, y as u32, size as u32, size as u32).to_image()
}

/// Read an image folder into memory.
pub fn load(root: &Path, opts: &FolderOptions) -> Result<Folder> {
    if opts.size == 0 {
        return Err(Error::Config("image size must be positive".into()));
    }
    if !root.is_dir() {
        return Err(Error::BadFile {
            path: root.to_path_buf(),
            msg: "not a folder".into(),
        });
    }
    let mut files: Vec<(PathBuf, Option<u8>)> = Vec::new();
    let mut class_names = Vec::new();
    if opts.labelled {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
            .at(root)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        if classes.len() > 256 {
            return Err(Error::Config(format!(
                "{} class folders under {}; at most 256 are supported",
                classes.len(),
                root.display()
            )));
        }
        for (ci, c) in classes.iter().enumerate() {
            class_names.push(c.file_name().unwrap().to_string_lossy().into_owned());
            for f in list_images(c)? {
                files.push((f, Some(ci as u8)));
            }
        }
    } else {
        files = list_images(root)?.into_iter().map(|f| (f, None)).collect();
    }
    if files.is_empty() {
        return Err(Error::BadFile {
            path: root.to_path_buf(),
            msg: if opts.labelled {
                "no images found in root/<class>/*.{png,jpg,jpeg}".into()
            } else {
                "no images found in root/*.{png,jpg,jpeg}".into()
            },
        });
    }
    let decoded: Vec<Result<Image>> = files
        .par_iter()
        .map(|(p, _)| load_image(p, opts.size))
        .collect();
    let mut pixels = Vec::with_capacity(files.len() * 3 * opts.size * opts.size);
    let mut labels = Vec::new();
    let mut skipped = Vec::new();
    for ((path, label), img) in files.into_iter().zip(decoded) {
        match img {
            Ok(img) => {
                pixels.extend_from_slice(&img.data);
                if let Some(l) = label {
                    labels.push(l);
                }
            }
            Err(e) if opts.skip_bad => {
                tracing::warn!("skipping {e}");
                skipped.push(path);
            }
            Err(e) => return Err(e),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(
            "skipped {} unreadable image(s) under {}",
            skipped.len(),
            root.display()
        );
    }
    if pixels.is_empty() {
        return Err(Error::BadFile {
            path: root.to_path_buf(),
            msg: "no readable images".into(),
        });
    }
    Ok(Folder {
        data: InMemory {
            pixels,
            labels: opts.labelled.then_some(labels),
            class_names,
            channels: 3,
            height: opts.size,
            width: opts.size,
        },
        skipped,
    })
}
