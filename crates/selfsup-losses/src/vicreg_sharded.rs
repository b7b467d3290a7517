//! VICReg over a data-parallel group as one op with a closed-form backward.
//!
//! [`Vicreg::loss`] on embeddings gathered from every rank makes each rank compute the whole
//! batch's two `D x D` covariance matrices and their backward (three `N x D x D` products per
//! view, the same on every rank) through some twenty candle nodes, each with its own
//! zero-filled gradient buffer. Here each rank works on its own rows only:
//!
//! - forward: one sum over ranks of the per-dimension sums, the row count and the squared
//!   view difference; each rank centres its rows with the global means and forms its share of
//!   the Gram matrices `x_c^T x_c` (one `n x D x D` product per view); a second sum over ranks
//!   gives the global covariances, from which every rank gets the same loss;
//! - backward (no communication): `dL/dx = 2 s (a - b) / (N D)` (invariance)
//!   `- v [std_j < 1] x_c / (2 D std_j (N - 1))` (variance) `+ 4 c x_c C_off / (D (N - 1))`
//!   (covariance, `C_off` the covariance without its diagonal), one `n x D x D` product per
//!   view; the centring's own term vanishes (`x_c`'s columns sum to zero over the batch).
//!
//! The value is [`Vicreg::loss`] of the gathered batch; the gradient follows the collectives'
//! convention (`selfsup_dist`): each rank gets `world x dL/d(its rows)`, and the trainer's mean
//! over ranks of the parameter gradients is `dL/dθ`. f32 on the CPU.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};

use crate::ops::check_pair;
use crate::{Error, Result, Vicreg};

/// Adds `f32` buffers element-wise over the ranks of a data-parallel group, in place (every
/// rank calls it with a buffer of the same length, in the same order).
pub type SumAcrossRanks = Arc<dyn Fn(&mut [f32]) -> candle_core::Result<()> + Send + Sync>;

/// The data-parallel group a sharded loss sums over.
#[derive(Clone)]
pub struct Ranks {
    world: usize,
    sum: SumAcrossRanks,
}

impl Ranks {
    /// `world` ranks whose buffers `sum` adds up in place.
    pub fn new(world: usize, sum: SumAcrossRanks) -> Self {
        Self { world, sum }
    }
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranks").field("world", &self.world).finish()
    }
}

/// What the backward needs of one view: global means, standard deviations and the
/// covariance without its diagonal (`D x D`, row-major).
struct ViewStats {
    mean: Vec<f32>,
    std: Vec<f32>,
    cov_off: Vec<f32>,
}

struct Saved {
    /// Global batch size.
    n: usize,
    views: [ViewStats; 2],
}

struct VicregOp {
    weights: (f64, f64, f64),
    ranks: Option<Ranks>,
    saved: Mutex<Option<Saved>>,
}

impl VicregOp {
    fn sum(&self, b: &mut [f32]) -> candle_core::Result<()> {
        match &self.ranks {
            Some(r) if r.world > 1 => (r.sum)(b),
            _ => Ok(()),
        }
    }
    fn world(&self) -> usize {
        self.ranks.as_ref().map_or(1, |r| r.world)
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("sharded VICReg: contiguous f32 inputs only"),
    }
}

/// `x - mean` row by row, `(n, d)`.
fn centred(x: &[f32], mean: &[f32]) -> Vec<f32> {
    let d = mean.len();
    let mut out = x.to_vec();
    for row in out.chunks_mut(d) {
        for (v, m) in row.iter_mut().zip(mean) {
            *v -= m;
        }
    }
    out
}

/// `x^T x` of a row-major `(n, d)` matrix, `(d, d)` row-major.
fn gram(x: Vec<f32>, n: usize, d: usize) -> candle_core::Result<Vec<f32>> {
    let t = Tensor::from_vec(x, (n, d), &Device::Cpu)?;
    t.t()?.matmul(&t)?.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp2 for VicregOp {
    fn name(&self) -> &'static str {
        "selfsup-vicreg-sharded"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(s1, l1)?, slice(s2, l2)?);
        let (rows, d) = l1.shape().dims2()?;
        // Sums of each view's columns, this rank's row count, the squared difference.
        let mut head = vec![0f32; 2 * d + 2];
        let mut sq = 0f64;
        for (ra, rb) in a.chunks(d).zip(b.chunks(d)) {
            for j in 0..d {
                head[j] += ra[j];
                head[d + j] += rb[j];
                let e = (ra[j] - rb[j]) as f64;
                sq += e * e;
            }
        }
        head[2 * d] = rows as f32;
        head[2 * d + 1] = sq as f32;
        self.sum(&mut head)?;
        let n = head[2 * d].round() as usize;
        if n < 2 {
            candle_core::bail!("VICReg needs a batch of at least 2, got {n}");
        }
        let means: [Vec<f32>; 2] =
            [&head[..d], &head[d..2 * d]].map(|s| s.iter().map(|v| v / n as f32).collect());
        let mut grams = gram(centred(a, &means[0]), rows, d)?;
        grams.extend(gram(centred(b, &means[1]), rows, d)?);
        self.sum(&mut grams)?;
        let scale = 1.0 / (n as f64 - 1.0);
        let (sim, var_w, cov_w) = self.weights;
        let mut var = 0f64;
        let mut cov = 0f64;
        let mut views = Vec::with_capacity(2);
        for (v, mean) in means.into_iter().enumerate() {
            let mut c: Vec<f32> = grams[v * d * d..(v + 1) * d * d]
                .iter()
                .map(|&g| (g as f64 * scale) as f32)
                .collect();
            let mut std = Vec::with_capacity(d);
            let (mut hinge, mut off) = (0f64, 0f64);
            for j in 0..d {
                let s = (c[j * d + j] as f64 + 1e-4).sqrt();
                hinge += (1.0 - s).max(0.0);
                std.push(s as f32);
                c[j * d + j] = 0.0;
            }
            for &x in &c {
                off += x as f64 * x as f64;
            }
            var += hinge / d as f64;
            cov += off / d as f64;
            views.push(ViewStats {
                mean,
                std,
                cov_off: c,
            });
        }
        let inv = head[2 * d + 1] as f64 / (n * d) as f64;
        let loss = sim * inv + var_w * 0.5 * var + cov_w * cov;
        let views: [ViewStats; 2] = views
            .try_into()
            .map_err(|_| candle_core::Error::Msg("two views".into()))?;
        *self.saved.lock().expect("sharded VICReg state") = Some(Saved { n, views });
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("sharded VICReg state");
        let Some(saved) = guard.as_ref() else {
            candle_core::bail!("sharded VICReg: backward before forward")
        };
        let (rows, d) = a.dims2()?;
        let n = saved.n as f64;
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * self.world() as f64;
        let (sim, var_w, cov_w) = self.weights;
        let av = a.flatten_all()?.to_vec1::<f32>()?;
        let bv = b.flatten_all()?.to_vec1::<f32>()?;
        let k_inv = (g * sim * 2.0 / (n * d as f64)) as f32;
        let k_cov = (g * cov_w * 4.0 / (d as f64 * (n - 1.0))) as f32;
        let mut out = Vec::with_capacity(2);
        for (v, (x, sign)) in [(&av, 1f32), (&bv, -1f32)].into_iter().enumerate() {
            let st = &saved.views[v];
            let xc = centred(x, &st.mean);
            // Variance term per dimension: zero where the standard deviation is at least 1.
            let k_var: Vec<f32> = st
                .std
                .iter()
                .map(|&s| {
                    if s < 1.0 {
                        (-g * var_w * 0.5 / (d as f64 * s as f64 * (n - 1.0))) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let xct = Tensor::from_slice(&xc, (rows, d), &Device::Cpu)?;
            let coff = Tensor::from_slice(&st.cov_off, (d, d), &Device::Cpu)?;
            let mut dx = xct.matmul(&coff)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, row) in dx.chunks_mut(d).enumerate() {
                for j in 0..d {
                    let e = av[i * d + j] - bv[i * d + j];
                    let c = xc[i * d + j];
                    row[j] = k_cov * row[j] + k_var[j] * c + sign * k_inv * e;
                }
            }
            out.push(Tensor::from_vec(dx, (rows, d), a.device())?);
        }
        let db = out.pop();
        let da = out.pop();
        Ok((da, db))
    }
}

impl Vicreg {
    /// The loss of the global batch made of every rank's rows of `a` and `b` (`(n, D)` here;
    /// with `ranks` `None` or of one rank, these rows alone), without gathering the rows: see
    /// the module documentation. Equal to [`crate::PairLoss::loss`] on the gathered batch (to
    /// rounding); f32 on the CPU only.
    pub fn sharded_loss(&self, a: &Tensor, b: &Tensor, ranks: Option<&Ranks>) -> Result<Tensor> {
        check_pair(a, b, "VICReg")?;
        if !a.device().is_cpu() || a.dtype() != candle_core::DType::F32 {
            return Err(Error::Input(format!(
                "sharded VICReg takes f32 tensors on the CPU, got {:?} on {:?}",
                a.dtype(),
                a.device().location()
            )));
        }
        let op = VicregOp {
            weights: self.weights(),
            ranks: ranks.cloned(),
            saved: Mutex::new(None),
        };
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, op)?)
    }
}
