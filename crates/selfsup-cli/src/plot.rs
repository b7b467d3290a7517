//! `selfsup plot RUN [RUN ...]`: a PNG of the training curves in the runs' `metrics.jsonl`:
//! loss by step, kNN top-1 by epoch and the embedding standard deviation (the collapse signal)
//! by step, one colour per run.
//!
//! Drawn with `plotters` on an in-memory bitmap (text with the DejaVu Sans Mono font embedded
//! in the binary, so that no system font is needed), then written atomically as a PNG.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// The curves of one run.
#[derive(Debug, Default)]
pub struct Curves {
    /// Label in the legend.
    pub name: String,
    /// (step, loss) of the logged steps.
    pub loss: Vec<(f64, f64)>,
    /// (epoch, kNN top-1 in %).
    pub knn: Vec<(f64, f64)>,
    /// (step, embedding std).
    pub embed_std: Vec<(f64, f64)>,
}

/// The largest magnitude drawn (the axes' arithmetic stays finite well beyond it).
const PLOTTABLE: f64 = 1e15;

/// Read `RUN/metrics.jsonl` (or a `metrics.jsonl` path). Lines that do not parse (a run killed
/// mid-write leaves at most one) are skipped with a warning, and so are values that are not
/// finite or beyond +/-1e15.
pub fn read_curves(run: &Path) -> Result<Curves> {
    let path = if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is it a run folder?)", path.display()))?;
    let name = run
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| run.display().to_string());
    let mut c = Curves {
        name,
        ..Default::default()
    };
    let mut bad = 0;
    let huge = std::cell::Cell::new(0usize);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            bad += 1;
            continue;
        };
        // Values no axis can span (a diverged loss of 1e308 made the axis range infinite and
        // the tick search endless) are skipped, and counted.
        let num = |k: &str| {
            let x = v[k].as_f64()?;
            if x.is_finite() && x.abs() <= PLOTTABLE {
                Some(x)
            } else {
                if !v[k].is_null() {
                    huge.set(huge.get() + 1);
                }
                None
            }
        };
        match v["kind"].as_str() {
            Some("step") => {
                if let (Some(s), Some(l)) = (num("step"), num("loss")) {
                    c.loss.push((s, l));
                }
                if let (Some(s), Some(e)) = (num("step"), num("embed_std")) {
                    c.embed_std.push((s, e));
                }
            }
            Some("epoch") => {
                if let (Some(e), Some(k)) = (num("epoch"), num("knn_top1")) {
                    c.knn.push((e, 100.0 * k));
                }
            }
            _ => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!("{}: skipped {bad} unreadable line(s)", path.display());
    }
    if huge.get() > 0 {
        tracing::warn!(
            "{}: skipped {} value(s) that are not finite or beyond +/-{PLOTTABLE:e}",
            path.display(),
            huge.get()
        );
    }
    if c.loss.is_empty() {
        bail!("{} has no training steps yet", path.display());
    }
    Ok(c)
}

fn range(points: impl Iterator<Item = (f64, f64)> + Clone, pad: f64) -> ((f64, f64), (f64, f64)) {
    let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn((f64, f64)) -> f64| {
        points.clone().map(sel).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::INFINITY, |p| p.0),
        fold(f64::max, f64::NEG_INFINITY, |p| p.0),
    );
    let (y0, y1) = (
        fold(f64::min, f64::INFINITY, |p| p.1),
        fold(f64::max, f64::NEG_INFINITY, |p| p.1),
    );
    let dy = ((y1 - y0) * pad).max(1e-6);
    let dx = if x1 > x0 { 0.0 } else { 1.0 };
    ((x0 - dx, x1 + dx), (y0 - dy, y1 + dy))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel(area: &Area, title: &str, x_label: &str, runs: &[(&Curves, &[(f64, f64)])]) -> Result<()> {
    let all = runs.iter().flat_map(|(_, p)| p.iter().copied());
    if all.clone().next().is_none() {
        area.titled(&format!("{title}: not measured"), ("sans-serif", 18))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(());
    }
    let ((x0, x1), (y0, y1)) = range(all, 0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (run, pts)) in runs.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(run.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        if pts.len() < 30 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Draw the curves of `runs` into a `width x height` RGB image.
pub fn render(runs: &[Curves], width: u32, height: u32) -> Result<Vec<u8>> {
    // Registering twice is harmless; the font is needed before any text is drawn.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/DejaVuSansMono.ttf"),
    )
    .map_err(|_| anyhow::anyhow!("the embedded font is unreadable"))?;
    let mut buf = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let areas = root.split_evenly((1, 3));
        let loss: Vec<_> = runs.iter().map(|c| (c, c.loss.as_slice())).collect();
        let knn: Vec<_> = runs.iter().map(|c| (c, c.knn.as_slice())).collect();
        let std: Vec<_> = runs.iter().map(|c| (c, c.embed_std.as_slice())).collect();
        panel(&areas[0], "training loss", "step", &loss)?;
        panel(&areas[1], "kNN top-1 (%)", "epoch", &knn)?;
        panel(&areas[2], "embedding std (collapse: -> 0)", "step", &std)?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(buf)
}

/// `selfsup plot`: read the runs, draw, write `out` (default `RUN/metrics.png`) atomically.
pub fn plot(runs: &[PathBuf], out: Option<&Path>) -> Result<PathBuf> {
    if runs.is_empty() {
        bail!("plot needs at least one run folder");
    }
    let curves = runs
        .iter()
        .map(|r| read_curves(r))
        .collect::<Result<Vec<_>>>()?;
    let out = match out {
        Some(o) => o.to_path_buf(),
        None if runs.len() == 1 && runs[0].is_dir() => runs[0].join("metrics.png"),
        None => bail!("with several runs, say where the picture goes with --out FILE.png"),
    };
    let (w, h) = (1500u32, 420u32);
    let buf = render(&curves, w, h)?;
    let img = image::RgbImage::from_raw(w, h, buf).context("bitmap size")?;
    let tmp = out.with_extension(format!("tmp-{}.png", std::process::id()));
    img.save(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}
