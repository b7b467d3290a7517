//! MPI through rsmpi (the `mpi` feature): the processes `mpirun` / `srun` started.

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use crate::{check_gather, check_root, Communicator, Error, Result};

struct Inner {
    // Dropping the universe finalises MPI; it lives as long as the communicator.
    _universe: Universe,
    world: SimpleCommunicator,
}

/// `MPI_COMM_WORLD` of an MPI job.
///
/// MPI is initialised with `MPI_THREAD_SERIALIZED` and every call holds one lock, so the
/// handle may be shared between threads (the training step issues collectives from the
/// thread that runs it, the loader never does).
pub struct MpiComm {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
}

// SAFETY: rsmpi's handles are raw MPI handles. MPI was initialised with at least
// MPI_THREAD_SERIALIZED and every use goes through `inner`'s lock, so no two threads are ever
// inside MPI at once.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl MpiComm {
    /// Initialise MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| Error::Comm {
                op: "init",
                msg: "MPI is already initialised in this process".into(),
            })?;
        if level < Threading::Serialized {
            return Err(Error::Comm {
                op: "init",
                msg: format!(
                    "the MPI library offers thread level {level:?}, selfsup needs Serialized"
                ),
            });
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            inner: Mutex::new(Inner {
                _universe: universe,
                world,
            }),
            rank,
            size,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&g.world)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn all_gather_bytes(&self, local: &[u8], out: &mut [u8]) -> Result<()> {
        check_gather(local, out, self.size)?;
        self.with(|w| w.all_gather_into(local, out));
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        self.with(|w| w.process_at_rank(root as i32).broadcast_into(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.with(|w| w.barrier());
        Ok(())
    }
    fn abort(&self, code: i32) {
        // Not through the lock: another thread may hold it, blocked in a collective.
        SimpleCommunicator::world().abort(code)
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
}
