//! Momentum (EMA) targets, shared by MoCo and BYOL.
//!
//! After every optimiser step each target parameter becomes `m * target + (1 - m) * online`
//! (`update_momentum` in lightly). `m` is constant (MoCo: 0.99) or follows BYOL's cosine schedule
//! from `base` to 1: `m_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2` at step `k` of `K`.
//! Only parameters are averaged; a target's BatchNorm buffers follow its own forward passes in
//! train mode, as in lightly.

use candle_core::Var;
use candle_nn::VarMap;

use crate::{is_trainable, Error, Result, TARGET_PREFIX};

/// The momentum schedule of a target network.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Momentum {
    /// `m` at step 0 (0.99).
    pub base: f64,
    /// Cosine schedule from `base` to 1 over the run (BYOL), or constant (MoCo v2).
    pub cosine: bool,
}

/// The momentum at `step` (from 0) of `total` steps.
pub fn momentum_at(m: Momentum, step: u64, total: u64) -> f64 {
    if !m.cosine || total == 0 {
        return m.base;
    }
    let t = (step.min(total) as f64) / total as f64;
    1.0 - (1.0 - m.base) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
}

/// `target = m * target + (1 - m) * online` for each `(online, target)` pair.
pub fn ema_update(pairs: &[(Var, Var)], m: f64) -> Result<()> {
    for (online, target) in pairs {
        let next = ((target.as_tensor() * m)? + (online.as_tensor() * (1.0 - m))?)?;
        target.set(&next)?;
    }
    Ok(())
}

/// The `(online, target)` variable pairs for the online modules under `prefixes` (their
/// targets are the same names behind [`TARGET_PREFIX`]); the targets are set to the online
/// values (BatchNorm buffers too), as a momentum network starts as a copy.
pub(crate) fn target_pairs(varmap: &VarMap, prefixes: &[&str]) -> Result<Vec<(Var, Var)>> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .collect();
    names.sort();
    let mut pairs = Vec::new();
    for name in names {
        let tname = format!("{TARGET_PREFIX}{name}");
        let target = data
            .get(&tname)
            .ok_or_else(|| Error::Config(format!("momentum target {tname} missing for {name}")))?;
        let online = &data[name];
        target.set(online.as_tensor())?;
        if is_trainable(name) {
            pairs.push((online.clone(), target.clone()));
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_goes_from_base_to_one() {
        let m = Momentum {
            base: 0.99,
            cosine: true,
        };
        assert_eq!(momentum_at(m, 0, 100), 0.99);
        assert!((momentum_at(m, 50, 100) - 0.995).abs() < 1e-12);
        assert_eq!(momentum_at(m, 100, 100), 1.0);
        let c = Momentum {
            base: 0.99,
            cosine: false,
        };
        assert_eq!(momentum_at(c, 70, 100), 0.99);
    }
}
