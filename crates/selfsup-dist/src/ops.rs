//! Collectives on candle tensors, with gradients.
//!
//! Convention (the one PyTorch's `all_gather` with gradient and lightly's `GatherLayer` follow):
//! every rank computes its own loss `L_r`, and the backward of a collective gives each rank the
//! derivative of `sum_r L_r`. So the backward of [`all_gather`] sums the gathered gradient over
//! ranks and keeps this rank's slice, and the backward of [`all_reduce_sum`] is again an
//! all-reduce sum. A loss computed on gathered tensors is the same on every rank, so
//! `sum_r L_r = world * L`, and the trainer's gradient *mean* over ranks yields `dL/dθ`
//! exactly: nothing is divided by the world size outside autograd.
//!
//! Tensors on the CPU are exchanged in place; tensors on another device are staged through host
//! memory (`to_device` is differentiable), the seam where a NCCL communicator would work on
//! device buffers instead.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::{all_gather_f32, all_gather_f64, Comm, Error, Result};

fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op} needs a contiguous tensor"),
    }
}

fn comm_err(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

struct Gather {
    comm: Comm,
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "all-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        if dims.is_empty() {
            candle_core::bail!("all-gather needs a tensor of rank >= 1");
        }
        dims[0] *= self.comm.world_size();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                all_gather_f32(self.comm.as_ref(), contiguous(v, l, self.name())?)
                    .map_err(comm_err)?,
            ),
            CpuStorage::F64(v) => CpuStorage::F64(
                all_gather_f64(self.comm.as_ref(), contiguous(v, l, self.name())?)
                    .map_err(comm_err)?,
            ),
            _ => candle_core::bail!(
                "all-gather supports f32 and f64, got {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = arg.dim(0)?;
        let summed = reduce_detached(&self.comm, grad).map_err(comm_err)?;
        Ok(Some(summed.narrow(0, self.comm.rank() * n, n)?))
    }
}

struct Reduce {
    comm: Comm,
}

impl CustomOp1 for Reduce {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => {
                let mut b = contiguous(v, l, self.name())?.to_vec();
                self.comm.all_reduce_sum_f32(&mut b).map_err(comm_err)?;
                CpuStorage::F32(b)
            }
            CpuStorage::F64(v) => {
                let mut b = contiguous(v, l, self.name())?.to_vec();
                self.comm.all_reduce_sum_f64(&mut b).map_err(comm_err)?;
                CpuStorage::F64(b)
            }
            _ => candle_core::bail!(
                "all-reduce supports f32 and f64, got {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(reduce_detached(&self.comm, grad).map_err(comm_err)?))
    }
}

/// Run a custom op on the CPU, staging tensors from other devices through host memory.
fn on_host(x: &Tensor, f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(f(&x.contiguous()?)?);
    }
    let dev = x.device().clone();
    let host = x.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    Ok(f(&host)?.to_device(&dev)?)
}

fn reduce_detached(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.detach());
    }
    on_host(&x.detach(), |h| h.apply_op1(Reduce { comm: comm.clone() })).map(|t| t.detach())
}

/// `(n, ...)` on each rank to `(world * n, ...)`, rank 0's rows first; every rank gets the same
/// tensor. Backward: the gradient of the gathered tensor summed over ranks, this rank's rows.
/// With one rank, `x` itself.
pub fn all_gather(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    on_host(x, |h| h.apply_op1(Gather { comm: comm.clone() }))
}

/// [`all_gather`] without a gradient, for any dtype (labels as `u32`, keys for a queue).
pub fn all_gather_detached(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.detach());
    }
    let dtype = x.dtype();
    let wide = match dtype {
        DType::F32 | DType::F64 => x.detach(),
        // Every integer label or index fits an f64 exactly.
        _ => x.to_dtype(DType::F64)?,
    };
    let g = all_gather(comm, &wide.detach())?.detach();
    Ok(if g.dtype() == dtype {
        g
    } else {
        g.to_dtype(dtype)?
    })
}

/// Element-wise sum over ranks; every rank gets the same tensor. Backward: the gradient summed
/// over ranks. With one rank, `x` itself.
pub fn all_reduce_sum(comm: &Comm, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    on_host(x, |h| h.apply_op1(Reduce { comm: comm.clone() }))
}
