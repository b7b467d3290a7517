//! `selfsup neighbors`: a picture of a query image and its nearest training images.

use std::path::{Path, PathBuf};

use crate::{data::*, encoder::*, set_threads};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use selfsup_data::folder;
use selfsup_data::{Dataset, Image, InMemory, Normalize};
use selfsup_eval::extract_features;
use selfsup_eval::Features;
use selfsup_train::parse_device;

/// Indices of the `k` bank rows most similar (cosine) to `q` `(1, D)`, best first, with scores.
pub fn nearest(bank: &Features, q: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let norm = |x: &Tensor| -> Result<Tensor> { Ok(selfsup_eval::l2_normalize(x)?) };
    let sims: Vec<f32> = norm(&bank.x)?
        .matmul(&norm(q)?.t()?)?
        .flatten_all()?
        .to_vec1()?;
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    idx.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
    Ok(idx.into_iter().take(k).map(|i| (i, sims[i])).collect())
}

/// The query image as a normalised `(1, 3, H, W)` tensor.
pub fn query_tensor(img: &Image, norm: &Normalize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        norm.apply(img),
        (1, img.channels, img.height, img.width),
        &Device::Cpu,
    )?)
}

/// Tile the query and its neighbours in one row, each scaled up `scale` times (nearest), with
/// a 4-pixel white gap, and write a PNG atomically.
pub fn write_grid(
    query: &Image,
    bank: &InMemory,
    hits: &[(usize, f32)],
    scale: u32,
    out: &Path,
) -> Result<()> {
    let side = query.height as u32 * scale;
    let gap = 4;
    let n = hits.len() as u32 + 1;
    let mut canvas = image::RgbImage::from_pixel(
        n * side + (n + 1) * gap + gap,
        side + 2 * gap,
        image::Rgb([255, 255, 255]),
    );
    let mut tiles = vec![query.clone()];
    for &(i, _) in hits {
        tiles.push(bank.get(i)?.image);
    }
    for (t, img) in tiles.iter().enumerate() {
        let rgb = image::imageops::resize(
            &img.to_rgb(),
            side,
            side,
            image::imageops::FilterType::Nearest,
        );
        // An extra gap after the query separates it from its neighbours.
        let x0 = gap + t as u32 * (side + gap) + if t > 0 { gap } else { 0 };
        image::imageops::overlay(&mut canvas, &rgb, x0 as i64, gap as i64);
    }
    let tmp = out.with_extension(format!("tmp-{}.png", std::process::id()));
    canvas
        .save(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

#[derive(Args)]
pub(crate) struct NeighborsArgs {
    #[command(flatten)]
    pub(crate) ck: CheckpointArgs,
    /// An image file, or `cifar10-test:INDEX`.
    #[arg(long)]
    pub(crate) query: String,
    /// Neighbours to show.
    #[arg(long, default_value_t = 8)]
    pub(crate) k: usize,
    /// Output PNG.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn neighbors_cmd(a: &NeighborsArgs) -> Result<()> {
    set_threads(a.ck.threads);
    let device = parse_device(&a.ck.device)?;
    if a.ck.recalibrate_bn {
        bail!("--recalibrate-bn applies to `selfsup eval` (knn, linear, low-label's probe); recalibrate in training with --bn-recalibrate true");
    }
    let (enc, cfg) = load_encoder(&a.ck, &device)?;
    let enc = for_inference(enc, &a.ck, &cfg, &Normalize::cifar10());
    let (train, test) = load_cifar(&a.ck.data_dir, "", "")?;
    let query = match a.query.strip_prefix("cifar10-test:") {
        Some(i) => {
            let i: usize = i
                .parse()
                .with_context(|| format!("bad index in {:?}", a.query))?;
            selfsup_data::Dataset::get(&test, i)?.image
        }
        None => folder::load_image(Path::new(&a.query), 32)?,
    };
    let bank = extract_features(
        enc.as_ref(),
        &eval_loader(train.clone(), 32, Normalize::cifar10(), a.ck.threads)?,
        &device,
    )?;
    let q = enc
        .features(&query_tensor(&query, &Normalize::cifar10())?.to_device(&device)?)?
        .to_device(&Device::Cpu)?;
    let hits = nearest(&bank, &q, a.k)?;
    write_grid(&query, &train, &hits, 4, &a.out)?;
    let names = &train.class_names;
    let labels = train.label_vec().unwrap_or_default();
    let desc: Vec<String> = hits
        .iter()
        .map(|&(i, s)| {
            format!(
                "#{i} {} ({s:.3})",
                labels.get(i).map(|&l| names[l].as_str()).unwrap_or("?")
            )
        })
        .collect();
    println!("wrote {}: {}", a.out.display(), desc.join(", "));
    Ok(())
}
