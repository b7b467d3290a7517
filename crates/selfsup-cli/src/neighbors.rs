//! `selfsup neighbors`: a picture of a query image and its nearest training images.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use selfsup_data::{Dataset, Image, InMemory, Normalize};
use selfsup_eval::Features;

/// Indices of the `k` bank rows most similar (cosine) to `q` `(1, D)`, best first, with scores.
pub fn nearest(bank: &Features, q: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let norm = |x: &Tensor| -> Result<Tensor> {
        let n = x
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        Ok(x.broadcast_div(&n)?)
    };
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
