//! Storage access shared by the ops.

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous input; `op` names the op in the error.
pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The elements of a contiguous `f32` input; `op` names the op in the error.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        _ => candle_core::bail!("{op}: the fused kernel is f32 only"),
    }
}

/// The f32 values of a tensor's storage read in place (a fourth input, which a custom op cannot
/// take), which must be on the CPU.
pub(crate) fn storage_f32s<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => f32s(s, l, op),
        _ => candle_core::bail!("{op}: not on the CPU"),
    }
}
