//! Global average pooling `(N, C, H, W) -> (N, C)` as one op with an explicit backward.
//!
//! Composed, it is two `mean`s (each a sum and a scale) forward and their broadcasts backward,
//! each through candle's gradient store; here the forward is one pass over the planes and the
//! backward writes `dy / (H W)` over each plane.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct GlobalAvgPool;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::util::f32s(s, l, "global average pool")
}

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "selfsup-global-avg-pool"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims();
        let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
        let x = f32s(s, l)?;
        let y: Vec<f32> = x
            .par_chunks(hw)
            .map(|p| (crate::util::sum_f64(p) / hw as f64) as f32)
            .collect();
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        let g = dy.contiguous()?.apply_op1_no_bwd(&Spread { hw: h * w })?;
        Ok(Some(g.reshape((n, c, h, w))?))
    }
}

/// `(N, C) -> (N C H W)`: each value divided by `H W` over its plane.
struct Spread {
    hw: usize,
}

impl CustomOp1 for Spread {
    fn name(&self) -> &'static str {
        "selfsup-global-avg-pool-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = f32s(s, l)?;
        let hw = self.hw;
        let mut dx = vec![0f32; dy.len() * hw];
        dx.par_chunks_mut(hw)
            .zip(dy.par_iter())
            .for_each(|(p, &g)| p.fill(g / hw as f32));
        Ok((CpuStorage::F32(dx), Shape::from(dy.len() * hw)))
    }
}

/// The mean of each `(H, W)` plane of `x (N, C, H, W)`, `(N, C)` (f32, CPU; accumulated in
/// `f64`), differentiable.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h * w == 0 {
        candle_core::bail!("global average pool of empty planes {:?}", x.dims());
    }
    x.contiguous()?.apply_op1(GlobalAvgPool)
}
