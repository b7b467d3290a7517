//! # selfsup-dist
//!
//! Collectives for data-parallel training behind one narrow trait, [`Communicator`]: rank,
//! world size, all-reduce (sum) of `f32` / `f64` buffers, all-gather and broadcast of bytes,
//! barrier, abort. The trainer, the methods and synchronised BatchNorm talk only to this trait.
//!
//! | implementation | where | for |
//! | --- | --- | --- |
//! | [`Single`] | always | one process (the default; every collective is the identity) |
//! | [`LocalGroup`] | always | ranks as threads of one process (`selfsup train --ranks N`: data parallelism on one machine without MPI), and the fast tests of the gather / reduce maths |
//! | `MpiComm` | `mpi` feature | processes started by `mpirun` / `srun`, over the system's MPI (rsmpi) |
//!
//! Design choice: the engine is always an existing one (MPI for CPUs; NCCL is the seam for
//! GPUs: a `Communicator` over NCCL's all-reduce / all-gather / broadcast would plug in here
//! with no change above it). Across processes nothing here implements a reduction algorithm;
//! [`LocalGroup`], whose ranks are threads and cannot use MPI, sums through shared memory
//! (docs/ARCHITECTURE.md, "Hand-written where a crate exists, and why").
//!
//! On top of the trait, [`ops`] gives candle tensors two differentiable collectives:
//! [`all_gather`] (backward: the gathered gradient summed over ranks, this rank's slice kept)
//! and [`all_reduce_sum`] (backward: the gradient summed over ranks). With these, every rank
//! computes `L_r`, the backward yields `d(sum_r L_r)/dθ` restricted to the rank's samples, and
//! the trainer's gradient all-reduce (mean) gives exactly the single-process gradient of a
//! loss on the global batch; no gradient is ever scaled by `1/world` outside autograd.
#![warn(missing_docs)]

mod barrier;
mod local;
#[cfg(feature = "mpi")]
mod mpi_comm;
pub mod ops;

use std::fmt::Debug;
use std::sync::Arc;

pub use local::LocalGroup;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
pub use ops::{all_gather, all_gather_detached, all_reduce_sum};

/// Errors of the collectives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Buffers of the wrong length, a bad root, an unknown mode.
    #[error("{0}")]
    Config(String),
    /// The engine failed (a peer is gone, a timeout).
    #[error("collective {op} failed: {msg}")]
    Comm {
        /// Which collective.
        op: &'static str,
        /// What happened.
        msg: String,
    },
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A group of ranks that run the same program on different data.
///
/// Every rank must call the same collectives in the same order with buffers of the same length
/// (for all-gather: the same local length); results are identical on every rank.
pub trait Communicator: Send + Sync + Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `out` (`world_size() * local.len()` bytes) receives every rank's `local`, in rank order.
    fn all_gather_bytes(&self, local: &[u8], out: &mut [u8]) -> Result<()>;
    /// `buf` takes `root`'s contents on every rank.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Wait until every rank is here.
    fn barrier(&self) -> Result<()>;
    /// Stop every rank of the group with `code` (after an error on this one), so that no peer
    /// waits forever in a collective. Returns only where there is nothing to stop (one rank).
    fn abort(&self, code: i32);
    /// The engine's name (`single`, `mpi`, `local`).
    fn engine(&self) -> &'static str;
}

/// One process: rank 0 of 1; every collective leaves its buffer as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, local: &[u8], out: &mut [u8]) -> Result<()> {
        check_gather(local, out, 1)?;
        out.copy_from_slice(local);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _code: i32) {}
    fn engine(&self) -> &'static str {
        "single"
    }
}

/// A shared handle to a communicator.
pub type Comm = Arc<dyn Communicator>;

/// The single-process communicator as a [`Comm`].
pub fn single() -> Comm {
    Arc::new(Single)
}

pub(crate) fn check_gather(local: &[u8], out: &[u8], world: usize) -> Result<()> {
    if out.len() != local.len() * world {
        return Err(Error::Config(format!(
            "all-gather of {} bytes from {world} ranks needs {} bytes, got {}",
            local.len(),
            local.len() * world,
            out.len()
        )));
    }
    Ok(())
}

pub(crate) fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(Error::Config(format!(
            "broadcast root {root} is not a rank of a world of {world}"
        )));
    }
    Ok(())
}

/// Element-wise mean over ranks, in place (a sum, then one division).
pub fn all_reduce_mean_f32(comm: &dyn Communicator, buf: &mut [f32]) -> Result<()> {
    comm.all_reduce_sum_f32(buf)?;
    let w = comm.world_size();
    if w > 1 {
        let inv = 1.0 / w as f32;
        buf.iter_mut().for_each(|x| *x *= inv);
    }
    Ok(())
}

/// `buf` takes `root`'s values on every rank.
pub fn broadcast_f32(comm: &dyn Communicator, buf: &mut [f32], root: usize) -> Result<()> {
    comm.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
}

/// `buf` takes `root`'s values on every rank.
pub fn broadcast_f64(comm: &dyn Communicator, buf: &mut [f64], root: usize) -> Result<()> {
    comm.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
}

/// Every rank's `local` values, in rank order.
pub fn all_gather_f32(comm: &dyn Communicator, local: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; local.len() * comm.world_size()];
    comm.all_gather_bytes(
        bytemuck::cast_slice(local),
        bytemuck::cast_slice_mut(&mut out),
    )?;
    Ok(out)
}

/// Every rank's `local` values, in rank order.
pub fn all_gather_f64(comm: &dyn Communicator, local: &[f64]) -> Result<Vec<f64>> {
    let mut out = vec![0f64; local.len() * comm.world_size()];
    comm.all_gather_bytes(
        bytemuck::cast_slice(local),
        bytemuck::cast_slice_mut(&mut out),
    )?;
    Ok(out)
}

/// How `selfsup train` finds its world (`--dist`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// MPI when the process was started by an MPI launcher (`mpirun`, `srun`), one process
    /// otherwise.
    Auto,
    /// One process, whatever the environment says.
    Single,
    /// MPI, an error without the `mpi` feature.
    Mpi,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "single" => Ok(Self::Single),
            "mpi" => Ok(Self::Mpi),
            _ => Err(Error::Config(format!(
                "unknown --dist {s:?} (auto, single or mpi)"
            ))),
        }
    }
}

/// The world size an MPI launcher announced in the environment (OpenMPI, MPICH / Hydra, PMIx,
/// Slurm's `srun`), if any.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .iter()
        .filter(|k| **k != "SLURM_NTASKS" || std::env::var_os("SLURM_STEP_ID").is_some())
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// The communicator for `mode`. `Auto` picks MPI when a launcher started this process with a
/// world of more than one rank; without the `mpi` feature that is an error (N independent
/// processes would otherwise all train alone into one folder).
pub fn init(mode: Mode) -> Result<Comm> {
    let launched = launcher_world_size();
    let want_mpi = match mode {
        Mode::Single => false,
        Mode::Mpi => true,
        Mode::Auto => launched.is_some_and(|n| n > 1),
    };
    if !want_mpi {
        return Ok(single());
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Arc::new(MpiComm::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err(Error::Config(format!(
            "{} but this selfsup was built without MPI: build with `--features mpi` (or pass --dist single to train each process alone)",
            match launched {
                Some(n) => format!("an MPI launcher started {n} ranks"),
                None => "--dist mpi was asked for".to_string(),
            }
        )))
    }
}
