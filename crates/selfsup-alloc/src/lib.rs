//! # selfsup-alloc
//!
//! The allocator setup both binaries (`selfsup`, `cargo xtask`) share, written once:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: selfsup_alloc::Allocator = selfsup_alloc::Allocator;
//!
//! fn main() {
//!     selfsup_alloc::keep_freed_pages();
//!     // ...
//! }
//! ```
//!
//! Design choice: mimalloc keeps freed pages for reuse. candle allocates a fresh buffer per op,
//! and with the system allocator a quarter of a training step went to page faults. A library
//! cannot choose the global allocator, so each binary declares it; this crate only names it and
//! sets its one option.
#![warn(missing_docs)]

/// The global allocator of every selfsup binary (mimalloc).
pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's `mi_option_purge_delay` (index 15 in both its v2 and v3 option enums; the sys
/// crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the OS. By default mimalloc purges pages unused for 10 ms,
/// and every training step then re-faults (and the kernel re-zeroes) the same few hundred MiB
/// of activations: a third of the small-cnn step's samples sat in `clear_page`. Keeping the
/// pages made the small-cnn step about 1.3x faster (docs/benchmarks.md) for a peak RSS within
/// 10% of before. `MIMALLOC_PURGE_DELAY` in the environment still overrides this default.
/// Call it first thing in `main`.
pub fn keep_freed_pages() {
    // SAFETY: sets a process-wide allocator option; mimalloc documents options as settable at
    // any time.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) }
}
