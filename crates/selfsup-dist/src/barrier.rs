//! The barrier of [`crate::LocalGroup`]: spin briefly, then sleep.
//!
//! Thread ranks meet a few hundred times per training step (synchronised BatchNorm sums forward
//! and backward, the gradient all-reduce), each time after a few hundred microseconds of work
//! or less. `std::sync::Barrier` puts every early arriver to sleep on a futex, and waking a
//! sleeping thread on another core costs far more than the wait itself where that core has
//! gone idle (a halted virtual CPU is woken by an inter-processor interrupt through the
//! hypervisor): two thread ranks ran at 490-530 img/s with it against about 620 img/s for two
//! independent processes (docs/scaling.md). An early arriver here first spins on an atomic
//! generation counter for up to [`SPIN`], which covers the ranks' usual imbalance, and only
//! then sleeps on a condition variable, so a rank that waits long (a checkpoint, an
//! evaluation on rank 0) does not burn a core. Measured against `std`'s barrier on the
//! preset, the difference stayed inside the machine's run-to-run noise (docs/scaling.md,
//! "What the gap is made of"): it costs nothing and removes the sleeps from the profile.
//!
//! No crate offers this combination: `std`'s and `parking_lot`'s barriers always sleep,
//! `spin::Barrier` always spins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an early arriver spins before it sleeps.
pub(crate) const SPIN: Duration = Duration::from_micros(500);

/// A reusable barrier for `n` threads that spins for up to [`SPIN`] before it sleeps.
pub(crate) struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl SpinBarrier {
    pub(crate) fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Blocks until `n` threads have called `wait` for this generation.
    pub(crate) fn wait(&self) {
        // This generation cannot end before this thread arrives, so `gen` is the current one.
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            // Last to arrive: reset the count before anyone can see the new generation (the
            // Release below orders it first), then release the spinners and the sleepers. The
            // increment happens under the lock so that no sleeper checks between its test and
            // its wait.
            self.arrived.store(0, Ordering::Relaxed);
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.generation.fetch_add(1, Ordering::Release);
            drop(_g);
            self.wake.notify_all();
            return;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 128 == 0 && start.elapsed() > SPIN {
                let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                while self.generation.load(Ordering::Acquire) == gen {
                    g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Every thread sees every other thread's write of a generation before anyone starts the
    /// next one, whether the waits are short (spinning) or long (sleeping).
    #[test]
    fn no_thread_passes_before_all_arrive() {
        for (threads, rounds, sleepy) in [(2, 2000, false), (3, 500, false), (3, 20, true)] {
            let b = Arc::new(SpinBarrier::new(threads));
            let counters: Arc<Vec<AtomicU64>> =
                Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (b, c) = (b.clone(), counters.clone());
                    std::thread::spawn(move || {
                        for r in 1..=rounds as u64 {
                            if sleepy && t == 0 {
                                std::thread::sleep(SPIN * 2);
                            }
                            c[t].store(r, Ordering::SeqCst);
                            b.wait();
                            for o in c.iter() {
                                let v = o.load(Ordering::SeqCst);
                                assert_eq!(v, r, "a thread left round {r} early or late");
                            }
                            b.wait();
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
    }
}
