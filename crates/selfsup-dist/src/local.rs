//! Ranks as threads of one process: `selfsup train --ranks N`, and the tests of the collectives'
//! maths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::barrier::SpinBarrier;

use crate::{check_gather, check_root, Communicator, Error, Result};

struct Shared {
    barrier: SpinBarrier,
    slots: Vec<RwLock<Vec<u8>>>,
    /// Where each rank's buffer of the current reduction is, and its length.
    addrs: Vec<AtomicUsize>,
    lens: Vec<AtomicUsize>,
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
            barrier: SpinBarrier::new(world),
            slots: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            addrs: (0..world).map(|_| AtomicUsize::new(0)).collect(),
            lens: (0..world).map(|_| AtomicUsize::new(0)).collect(),
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

    /// Sum over the ranks in place, reading each other's buffers where they are (no copy to a
    /// shared slot): every rank publishes the address of its buffer; rank `r` then adds up
    /// chunk `r` of all buffers in rank order and writes it into its own buffer
    /// (reduce-scatter), and after a barrier copies every other chunk from the rank that
    /// summed it (all-gather); a last barrier keeps each buffer alive until nobody reads it.
    /// The ranks read and write disjoint ranges in each phase. Every element is summed once,
    /// in rank order, so every rank gets the same bits, and a rank moves `(2 - 1/world)` buffer
    /// lengths instead of the `world + 2` of summing everything everywhere.
    fn reduce<T: bytemuck::Pod + std::ops::Add<Output = T>>(
        &self,
        op: &'static str,
        buf: &mut [T],
    ) -> Result<()> {
        let world = self.shared.slots.len();
        if world == 1 {
            return Ok(());
        }
        let n = buf.len();
        // From here on this rank's buffer is only touched through `base`, as the others do.
        let base = buf.as_mut_ptr();
        self.shared.addrs[self.rank].store(base as usize, Ordering::Relaxed);
        self.shared.lens[self.rank].store(n, Ordering::Relaxed);
        // The barrier orders the stores above before every rank's loads below.
        self.shared.barrier.wait();
        let addrs: Vec<*mut T> = (0..world)
            .map(|r| self.shared.addrs[r].load(Ordering::Relaxed) as *mut T)
            .collect();
        if (0..world).any(|r| self.shared.lens[r].load(Ordering::Relaxed) != n) {
            // Every rank sees the mismatch; none may publish again before all have looked.
            self.shared.barrier.wait();
            return Err(Error::Comm {
                op,
                msg: "ranks passed buffers of different lengths".into(),
            });
        }
        let chunk = |r: usize| (n * r / world, n * (r + 1) / world);
        // Reduce-scatter: chunk `rank` of every buffer, which no other rank reads or writes
        // in this phase, summed block by block.
        const BLOCK: usize = 1024;
        let mut acc = [T::zeroed(); BLOCK];
        let (lo, hi) = chunk(self.rank);
        let mut at = lo;
        while at < hi {
            let len = (hi - at).min(BLOCK);
            let acc = &mut acc[..len];
            // SAFETY: every address is a live buffer of `n` elements (its rank waits in this
            // collective until the last barrier); `at..at + len` lies in chunk `rank`, which
            // only this rank accesses before the next barrier.
            unsafe {
                acc.copy_from_slice(std::slice::from_raw_parts(addrs[0].add(at), len));
                for &p in &addrs[1..] {
                    let part = std::slice::from_raw_parts(p.add(at), len);
                    for (a, &x) in acc.iter_mut().zip(part) {
                        *a = *a + x;
                    }
                }
                std::slice::from_raw_parts_mut(base.add(at), len).copy_from_slice(acc);
            }
            at += len;
        }
        self.shared.barrier.wait();
        // All-gather: chunk `r` from rank `r`, which no longer writes it; this rank writes
        // only the other chunks of its own buffer, which nobody reads in this phase.
        for (r, &p) in addrs.iter().enumerate() {
            if r == self.rank {
                continue;
            }
            let (lo, hi) = chunk(r);
            // SAFETY: as above; chunk `r` of buffer `r` is final and only read now, chunk `r`
            // of this rank's buffer is written by this rank only.
            unsafe {
                std::slice::from_raw_parts_mut(base.add(lo), hi - lo)
                    .copy_from_slice(std::slice::from_raw_parts(p.add(lo), hi - lo));
            }
        }
        self.shared.barrier.wait();
        Ok(())
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
