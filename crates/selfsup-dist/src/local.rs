//! Ranks as threads of one process: `selfsup train --ranks N`, and the tests of the collectives'
//! maths.

use std::sync::{Arc, Barrier, RwLock};

use crate::{check_gather, check_root, Communicator, Error, Result};

struct Shared {
    barrier: Barrier,
    slots: Vec<RwLock<Vec<u8>>>,
}

/// One rank of a group of threads that share memory. Build the group with
/// [`LocalGroup::new`] and move one member into each thread.
///
/// Reductions add the ranks' buffers in rank order, so every rank gets the same bits. A rank that
/// stops leaves the others waiting at the next collective: whoever runs the ranks ends the
/// process when one fails (the CLI does), and [`Communicator::abort`] panics.
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("world", &self.shared.slots.len())
            .finish()
    }
}

impl LocalGroup {
    /// `world` members, rank `i` at index `i`.
    pub fn new(world: usize) -> Result<Vec<LocalGroup>> {
        if world == 0 {
            return Err(Error::Config("a group needs at least one rank".into()));
        }
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Publish `bytes` as this rank's slot, wait for all, run `read` over all slots, wait again
    /// (so that no slot is overwritten while someone still reads it).
    fn exchange<T>(&self, bytes: &[u8], read: impl FnOnce(&[RwLock<Vec<u8>>]) -> T) -> T {
        self.publish(bytes);
        self.read_all(read)
    }

    fn publish(&self, bytes: &[u8]) {
        let mut slot = self.shared.slots[self.rank].write().unwrap();
        slot.clear();
        slot.extend_from_slice(bytes);
    }

    fn read_all<T>(&self, read: impl FnOnce(&[RwLock<Vec<u8>>]) -> T) -> T {
        self.shared.barrier.wait();
        let out = read(&self.shared.slots);
        self.shared.barrier.wait();
        out
    }

    /// Every rank publishes its buffer once and sums all of them in rank order, reading the
    /// others' slots in place (all ranks read at once): one copy per rank, whatever the world.
    fn reduce<T: bytemuck::Pod + std::ops::Add<Output = T>>(
        &self,
        op: &'static str,
        buf: &mut [T],
    ) -> Result<()> {
        let n = buf.len();
        self.publish(bytemuck::cast_slice(buf));
        self.read_all(|slots| {
            let guards: Vec<_> = slots.iter().map(|s| s.read().unwrap()).collect();
            // A slot's bytes are aligned for T unless the allocator says otherwise; then a copy.
            let parts: Vec<std::borrow::Cow<[T]>> = guards
                .iter()
                .map(|g| match bytemuck::try_cast_slice::<u8, T>(g) {
                    Ok(v) => std::borrow::Cow::Borrowed(v),
                    Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(g)),
                })
                .collect();
            if parts.iter().any(|p| p.len() != n) {
                return Err(Error::Comm {
                    op,
                    msg: "ranks passed buffers of different lengths".into(),
                });
            }
            for (i, x) in buf.iter_mut().enumerate() {
                let mut acc = parts[0][i];
                for p in &parts[1..] {
                    acc = acc + p[i];
                }
                *x = acc;
            }
            Ok(())
        })
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.slots.len()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce("all-reduce", buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce("all-reduce", buf)
    }
    fn all_gather_bytes(&self, local: &[u8], out: &mut [u8]) -> Result<()> {
        check_gather(local, out, self.world_size())?;
        let n = local.len();
        self.exchange(local, |slots| {
            for (r, s) in slots.iter().enumerate() {
                let s = s.read().unwrap();
                if s.len() != n {
                    return Err(Error::Comm {
                        op: "all-gather",
                        msg: "ranks passed buffers of different lengths".into(),
                    });
                }
                out[r * n..(r + 1) * n].copy_from_slice(&s);
            }
            Ok(())
        })
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        let mine = if self.rank == root {
            buf.to_vec()
        } else {
            vec![]
        };
        self.exchange(&mine, |slots| {
            let s = slots[root].read().unwrap();
            if s.len() != buf.len() {
                return Err(Error::Comm {
                    op: "broadcast",
                    msg: format!(
                        "root sent {} bytes, this rank expects {}",
                        s.len(),
                        buf.len()
                    ),
                });
            }
            buf.copy_from_slice(&s);
            Ok(())
        })
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) {
        panic!(
            "rank {} aborted the local group with code {code}",
            self.rank
        );
    }
    fn engine(&self) -> &'static str {
        "local"
    }
}
