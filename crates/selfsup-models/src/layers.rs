//! Layers with PyTorch's default initialisation and torchvision's parameter names.
//!
//! | layer | weight init | bias init |
//! | --- | --- | --- |
//! | [`Conv2d`] (`conv2d`) | `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (PyTorch default) | same bound |
//! | [`Conv2d`] (`conv2d_kaiming`) | `N(0, 2 / fan_out)` (torchvision ResNet) | none |
//! | [`Linear`] | `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` | same bound |
//! | [`BatchNorm`] | weight 1, bias 0, running mean 0, running var 1 | |

use std::cell::{Cell, RefCell};

use candle_core::{Module, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use selfsup_dist::Comm;

use crate::Result;

thread_local! {
    static SYNC_BN: RefCell<Option<Comm>> = const { RefCell::new(None) };
    static BN_MOMENTUM: Cell<Option<f64>> = const { Cell::new(None) };
}

/// Run `f` with every [`BatchNorm`] that updates its running statistics on this thread using
/// momentum `m` instead of its own (`m = 1`: the statistics of the batch replace them; `1 / i`
/// at the `i`-th batch: the running statistics become the mean over the batches, PyTorch's
/// `momentum=None`): what precise BatchNorm (`selfsup_eval::recalibrate_batch_norm`) needs
/// from an encoder whose layers it does not know.
pub fn with_bn_momentum<T>(m: f64, f: impl FnOnce() -> T) -> T {
    let prev = BN_MOMENTUM.with(|c| c.replace(Some(m)));
    let out = f();
    BN_MOMENTUM.with(|c| c.set(prev));
    out
}

/// While the returned guard lives, every [`BatchNorm`] built on this thread synchronises its
/// training statistics over `comm`'s ranks (SyncBatchNorm); dropping it restores what was
/// before. Encoders and heads are built unchanged inside the scope, as PyTorch's
/// `convert_sync_batchnorm` converts a model built without knowing of ranks.
pub fn sync_batch_norm_scope(comm: Option<Comm>) -> SyncBnScope {
    let prev = SYNC_BN.with(|s| s.replace(comm.filter(|c| c.world_size() > 1)));
    SyncBnScope { prev }
}

/// Guard of [`sync_batch_norm_scope`].
pub struct SyncBnScope {
    prev: Option<Comm>,
}

impl Drop for SyncBnScope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        SYNC_BN.with(|s| *s.borrow_mut() = prev);
    }
}

/// Names of buffers that are saved with the weights but never optimised.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// Whether a parameter is exempt from weight decay (and LARS adaptation): biases and norm
/// parameters, i.e. every parameter of rank one.
pub fn no_weight_decay(name: &str, t: &Tensor) -> bool {
    t.rank() <= 1 || name.ends_with(".bias")
}

/// 2-D convolution (square kernel), `(N, C_in, H, W) -> (N, C_out, H', W')`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `(C_out, C_in, k, k)`.
    pub weight: Tensor,
    /// `(C_out,)`, if any.
    pub bias: Option<Tensor>,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

fn uniform_bound(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// Convolution with PyTorch's default initialisation.
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let init = uniform_bound(c_in * k * k);
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(c_out, "bias", init)?)
    } else {
        None
    };
    Ok(Conv2d {
        weight,
        bias,
        stride,
        padding,
    })
}

/// Bias-free convolution with torchvision ResNet's `kaiming_normal_(mode="fan_out")`.
pub fn conv2d_kaiming(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let std = (2.0 / (c_out * k * k) as f64).sqrt();
    let weight = vb.get_with_hints(
        (c_out, c_in, k, k),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    Ok(Conv2d {
        weight,
        bias: None,
        stride,
        padding,
    })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // im2col + one matrix product on the CPU (selfsup-ops); candle's conv2d elsewhere.
        let y = selfsup_ops::conv2d(x, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// The convolution in training (`train`) or inference mode: in inference on the CPU the
    /// 3x3 stride-1 layers take the Winograd forward (`selfsup_ops::conv2d_fast_forward`, same
    /// backward), which made resnet18 feature extraction 1.2-1.5x faster but no training step
    /// faster (docs/benchmarks.md).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            return Ok(self.forward(x)?);
        }
        let y = selfsup_ops::conv2d_fast_forward(x, &self.weight, self.stride, self.padding)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        })
    }
}

/// Fully connected layer, `(N, in) -> (N, out)`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(out,)`.
    pub bias: Option<Tensor>,
}

/// Linear layer with PyTorch's default initialisation.
pub fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = uniform_bound(d_in);
    let weight = vb.get_with_hints((d_out, d_in), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(d_out, "bias", init)?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Batch normalisation over dim 1 of `(N, C)` or `(N, C, H, W)` inputs (BatchNorm1d/2d).
///
/// Train mode normalises with the batch's biased variance and updates the running statistics
/// with momentum 0.1 and the unbiased variance, exactly as PyTorch; eval mode uses the running
/// statistics and changes nothing.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Scale `(C,)` (absent when not affine).
    pub weight: Option<Tensor>,
    /// Shift `(C,)`.
    pub bias: Option<Tensor>,
    /// Running mean `(C,)`.
    pub running_mean: Var,
    /// Running variance `(C,)`.
    pub running_var: Var,
    /// Momentum of the running statistics.
    pub momentum: f64,
    /// Added to the variance.
    pub eps: f64,
    /// Ranks whose batches form one BatchNorm batch in training (SyncBatchNorm), if any.
    pub sync: Option<Comm>,
}

/// BatchNorm with affine parameters (PyTorch defaults: eps 1e-5, momentum 0.1).
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    batch_norm_opts(c, true, vb)
}

/// BatchNorm, optionally without affine parameters.
pub fn batch_norm_opts(c: usize, affine: bool, vb: VarBuilder) -> Result<BatchNorm> {
    let (weight, bias) = if affine {
        (
            Some(vb.get_with_hints(c, "weight", Init::Const(1.0))?),
            Some(vb.get_with_hints(c, "bias", Init::Const(0.0))?),
        )
    } else {
        (None, None)
    };
    let rm = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
    let rv = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Var::from_tensor(&rm)?,
        running_var: Var::from_tensor(&rv)?,
        momentum: 0.1,
        eps: 1e-5,
        sync: SYNC_BN.with(|s| s.borrow().clone()),
    })
}

impl BatchNorm {
    fn stat_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut s = vec![1; x.rank()];
        s[1] = x.dim(1).unwrap_or(1);
        s
    }

    /// Normalise; `train` selects batch or running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// Normalise, then (with `relu`) rectify: `relu(bn(x))` as one fused op on the CPU in
    /// training mode (selfsup-ops), composed elsewhere.
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (y, rectified) = self.normalise(x, train, relu)?;
        Ok(if relu && !rectified { y.relu()? } else { y })
    }

    /// `relu(bn(x) + residual)` (a ResNet block's tail): one fused op on the CPU in training
    /// mode (selfsup-ops), composed elsewhere.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if let (true, Some(w), Some(b)) = (self.fused(x, train), &self.weight, &self.bias) {
            self.check_input(x, true)?;
            let out = selfsup_ops::batch_norm_add_relu_train(
                x,
                w,
                b,
                residual,
                self.eps,
                self.ops_sync().as_ref(),
            )?;
            self.update_running(&out.mean, &out.var, x.elem_count() / x.dim(1)?)?;
            return Ok(out.y);
        }
        if self.eval_fused(x, train) && residual.dims() == x.dims() {
            // relu(bn(x) + residual) in one pass (selfsup-ops).
            self.check_input(x, false)?;
            let (s, b) = self.eval_scale_shift(x.dtype())?;
            let (one, zero) = (s.ones_like()?, s.zeros_like()?);
            return Ok(selfsup_ops::scale_shift_add_relu(
                x, &s, &b, residual, &one, &zero,
            )?);
        }
        Ok((self.forward_t(x, train)? + residual)?.relu()?)
    }

    /// `relu(bn(x) + residual_bn(residual))` (a block with a projection shortcut): one fused op
    /// on the CPU in training mode that never keeps the normalised shortcut, composed elsewhere.
    pub fn forward_add_bn_relu(
        &self,
        x: &Tensor,
        residual: &Tensor,
        residual_bn: &BatchNorm,
        train: bool,
    ) -> Result<Tensor> {
        let both = self.fused(x, train) && residual_bn.fused(residual, train);
        if let (true, Some(w), Some(b), Some(rw), Some(rb)) = (
            both,
            &self.weight,
            &self.bias,
            &residual_bn.weight,
            &residual_bn.bias,
        ) {
            if self.eps == residual_bn.eps {
                self.check_input(x, true)?;
                residual_bn.check_input(residual, true)?;
                let out = selfsup_ops::batch_norm_add_bn_relu_train(
                    x,
                    w,
                    b,
                    residual,
                    rw,
                    rb,
                    self.eps,
                    self.ops_sync().as_ref(),
                )?;
                let per_channel = |t: &Tensor| Ok::<_, crate::Error>(t.elem_count() / t.dim(1)?);
                self.update_running(&out.x.mean, &out.x.var, per_channel(x)?)?;
                residual_bn.update_running(
                    &out.residual.mean,
                    &out.residual.var,
                    per_channel(residual)?,
                )?;
                return Ok(out.y);
            }
        }
        if self.eval_fused(x, train) && residual.dims() == x.dims() {
            // relu(bn(x) + bn_r(residual)) in one pass (selfsup-ops).
            self.check_input(x, false)?;
            residual_bn.check_input(residual, false)?;
            let (s, b) = self.eval_scale_shift(x.dtype())?;
            let (rs, rb) = residual_bn.eval_scale_shift(x.dtype())?;
            return Ok(selfsup_ops::scale_shift_add_relu(
                x, &s, &b, residual, &rs, &rb,
            )?);
        }
        let r = residual_bn.forward_t(residual, train)?;
        self.forward_add_relu(x, &r, train)
    }

    /// `max_pool2d(relu(bn(x)))` (small-cnn's layers, the ImageNet stem): in training mode on
    /// the CPU one op that recomputes `relu(bn(x))` in its backward instead of keeping it
    /// (`selfsup_ops::batch_norm_relu_max_pool2d`); composed elsewhere.
    pub fn forward_relu_max_pool(
        &self,
        x: &Tensor,
        train: bool,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        if let (true, Some(w), Some(b)) = (self.fused(x, train), &self.weight, &self.bias) {
            if x.rank() == 4 && 2 * padding <= k {
                self.check_input(x, true)?;
                let out = selfsup_ops::batch_norm_relu_max_pool2d(
                    x,
                    w,
                    b,
                    self.eps,
                    k,
                    stride,
                    padding,
                    self.ops_sync().as_ref(),
                )?;
                self.update_running(&out.mean, &out.var, x.elem_count() / x.dim(1)?)?;
                return Ok(out.y);
            }
        }
        max_pool2d(&self.forward_act(x, train, true)?, k, stride, padding)
    }

    /// `max_pool2d(relu(bn(conv(x))))` (small-cnn's layers): in training mode on the CPU one
    /// node of the graph (`selfsup_ops::conv2d_batch_norm_relu_max_pool2d`), so that the
    /// convolution's output gradient skips candle's zero-filled accumulation; otherwise the
    /// convolution then [`Self::forward_relu_max_pool`]. The same values either way.
    pub fn forward_conv_relu_max_pool(
        &self,
        x: &Tensor,
        conv: &Conv2d,
        train: bool,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        if let (true, Some(w), Some(b), None) =
            (self.fused(x, train), &self.weight, &self.bias, &conv.bias)
        {
            let c = self.running_mean.dim(0)?;
            let cw = conv.weight.dims();
            if x.rank() == 4 && cw.len() == 4 && cw[0] == c && cw[2] == cw[3] && 2 * padding <= k {
                let out = selfsup_ops::conv2d_batch_norm_relu_max_pool2d(
                    x,
                    &conv.weight,
                    conv.stride,
                    conv.padding,
                    w,
                    b,
                    self.eps,
                    k,
                    stride,
                    padding,
                    self.ops_sync().as_ref(),
                )?;
                // Values per channel of the convolution's output, for the running variance.
                let (n, _, h, wd) = x.dims4()?;
                let side = |s: usize| (s + 2 * conv.padding - cw[2]) / conv.stride + 1;
                let count = n * side(h) * side(wd);
                if count < 2 {
                    return Err(crate::Error::Config(format!(
                        "batch norm in train mode needs more than one value per channel, got {count} from input {:?}",
                        x.shape()
                    )));
                }
                self.update_running(&out.mean, &out.var, count)?;
                return Ok(out.y);
            }
        }
        self.forward_relu_max_pool(&conv.forward_t(x, train)?, train, k, stride, padding)
    }

    /// `conv(relu(bn(x)))` (the middle of a ResNet block): in training mode on the CPU one op
    /// that recomputes `relu(bn(x))` in its backward instead of keeping it
    /// (`selfsup_ops::batch_norm_relu_conv2d`, an activation-sized tensor less per use);
    /// composed elsewhere.
    pub fn forward_relu_conv(&self, x: &Tensor, train: bool, conv: &Conv2d) -> Result<Tensor> {
        if let (true, Some(w), Some(b)) = (self.fused(x, train), &self.weight, &self.bias) {
            if x.rank() == 4 {
                self.check_input(x, true)?;
                let out = selfsup_ops::batch_norm_relu_conv2d(
                    x,
                    w,
                    b,
                    self.eps,
                    &conv.weight,
                    conv.stride,
                    conv.padding,
                    self.ops_sync().as_ref(),
                )?;
                self.update_running(&out.mean, &out.var, x.elem_count() / x.dim(1)?)?;
                return Ok(match &conv.bias {
                    Some(cb) => out.y.broadcast_add(&cb.reshape((1, (), 1, 1))?)?,
                    None => out.y,
                });
            }
        }
        conv.forward_t(&self.forward_act(x, train, true)?, train)
    }

    /// The input has this norm's channels, and in train mode more than one value per channel.
    fn check_input(&self, x: &Tensor, train: bool) -> Result<()> {
        let c = self.running_mean.dim(0)?;
        if x.rank() < 2 || x.dim(1)? != c {
            return Err(crate::Error::Config(format!(
                "batch norm over {c} channels got input of shape {:?}",
                x.shape()
            )));
        }
        if train && x.elem_count() / c < 2 {
            return Err(crate::Error::Config(format!(
                "batch norm in train mode needs more than one value per channel, got input of shape {:?}",
                x.shape()
            )));
        }
        Ok(())
    }

    fn fused(&self, x: &Tensor, train: bool) -> bool {
        train
            && x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && self.weight.is_some()
            && self.bias.is_some()
    }

    /// BatchNorm; the fused paths also apply the ReLU when `relu` (the flag returned).
    fn normalise(&self, x: &Tensor, train: bool, relu: bool) -> Result<(Tensor, bool)> {
        self.check_input(x, train)?;
        let c = self.running_mean.dim(0)?;
        let shape = self.stat_shape(x);
        if let (true, Some(w), Some(b)) = (self.fused(x, train), &self.weight, &self.bias) {
            // Fused CPU kernel (selfsup-ops): one pass for the statistics, one for the output,
            // closed-form backward.
            let n = x.elem_count() / c;
            let out =
                selfsup_ops::batch_norm_train(x, w, b, self.eps, relu, self.ops_sync().as_ref())?;
            self.update_running(&out.mean, &out.var, n)?;
            return Ok((out.y, true));
        }
        if !train && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            // Eval mode on the CPU: running statistics and affine parameters folded into one
            // per-channel scale and shift, applied (with the ReLU) in one op (selfsup-ops).
            let (scale, shift) = self.eval_scale_shift(x.dtype())?;
            return Ok((selfsup_ops::scale_shift(x, &scale, &shift, relu)?, true));
        }
        let (mean, var) = if train {
            let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
            // Per-channel sums over this rank's batch, or (synchronised) over every rank's:
            // the all-reduce is differentiable, so the backward sums over ranks too.
            let world = self.sync.as_ref().map_or(1, |c| c.world_size());
            let n = x.elem_count() / c * world;
            let n_local = x.elem_count() / c;
            let mean = self
                .batch_total(x.sum_keepdim(dims.as_slice())?)?
                .affine(1.0 / n as f64, 0.0)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = self
                .batch_total(xc.sqr()?.sum_keepdim(dims.as_slice())?)?
                .affine(1.0 / n as f64, 0.0)?;
            self.update_running(&mean.flatten_all()?, &var.flatten_all()?, n_local)?;
            let inv = (var + self.eps)?.sqrt()?.recip()?;
            let y = xc.broadcast_mul(&inv)?;
            return Ok((self.affine(y, &shape)?, false));
        } else {
            (
                self.running_mean
                    .as_tensor()
                    .to_dtype(x.dtype())?
                    .reshape(shape.as_slice())?,
                self.running_var
                    .as_tensor()
                    .to_dtype(x.dtype())?
                    .reshape(shape.as_slice())?,
            )
        };
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let y = x.broadcast_sub(&mean)?.broadcast_mul(&inv)?;
        Ok((self.affine(y, &shape)?, false))
    }

    /// The fused ops' view of the synchronisation: sums added up over the ranks.
    fn ops_sync(&self) -> Option<selfsup_ops::BnSync> {
        let comm = self.sync.clone()?;
        let world = comm.world_size();
        Some(selfsup_ops::BnSync::new(
            comm.rank(),
            world,
            std::sync::Arc::new(move |b: &mut [f64]| {
                comm.all_reduce_sum_f64(b)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }),
        ))
    }

    /// A per-channel sum over the BatchNorm batch: this rank's, or every rank's when synchronised.
    fn batch_total(&self, t: Tensor) -> Result<Tensor> {
        Ok(match &self.sync {
            Some(comm) => selfsup_dist::all_reduce_sum(comm, &t)?,
            None => t,
        })
    }

    /// Eval mode as `x * scale + shift`: the running statistics and affine parameters folded
    /// into one scale and shift per channel (differentiable in the affine parameters).
    fn eval_scale_shift(&self, dtype: candle_core::DType) -> Result<(Tensor, Tensor)> {
        let inv = (self.running_var.as_tensor().detach() + self.eps)?
            .sqrt()?
            .recip()?
            .to_dtype(dtype)?;
        let mean = self.running_mean.as_tensor().detach().to_dtype(dtype)?;
        Ok(match (&self.weight, &self.bias) {
            (Some(w), Some(b)) => {
                let scale = (w * &inv)?;
                let shift = (b - (&mean * &scale)?)?;
                (scale, shift)
            }
            _ => (inv.clone(), (mean * &inv)?.neg()?),
        })
    }

    /// Eval mode on the CPU in f32: the fused scale/shift kernels apply.
    fn eval_fused(&self, x: &Tensor, train: bool) -> bool {
        !train && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() >= 2
    }

    /// `n`: values per channel in this rank's batch (every rank's count when synchronised).
    fn update_running(&self, mean: &Tensor, var_biased: &Tensor, n: usize) -> Result<()> {
        let n = n * self.sync.as_ref().map_or(1, |c| c.world_size());
        let m = BN_MOMENTUM.with(|c| c.get()).unwrap_or(self.momentum);
        let mean = mean.detach().to_dtype(self.running_mean.dtype())?;
        let var = var_biased.detach().to_dtype(self.running_var.dtype())?;
        let new_mean = ((self.running_mean.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((self.running_var.as_tensor().detach() * (1.0 - m))?
            + (var * (m * n as f64 / (n as f64 - 1.0)))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(())
    }

    fn affine(&self, y: Tensor, shape: &[usize]) -> Result<Tensor> {
        Ok(match (&self.weight, &self.bias) {
            (Some(w), Some(b)) => y
                .broadcast_mul(&w.reshape(shape)?)?
                .broadcast_add(&b.reshape(shape)?)?,
            _ => y,
        })
    }
}

/// Max pooling with a square window, stride and (negative-infinity) padding, with a
/// gradient for every configuration.
///
/// On the CPU in f32 this is selfsup-ops' kernel (ties: the gradient goes to the first maximum,
/// as in PyTorch). Elsewhere it is the maximum of `k * k` strided views of the padded input,
/// which candle differentiates correctly (ties split the gradient): candle 0.11's own
/// `max_pool2d` has a backward only when kernel == stride without padding, and that backward
/// divides the gradient by `k^2`, so it is used only for inputs that need no gradient.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && 2 * padding <= k {
        // One op with an explicit backward (selfsup-ops).
        return Ok(selfsup_ops::max_pool2d(x, k, stride, padding)?);
    }
    if k == stride && padding == 0 && !x.track_op() {
        // candle's forward is right; its gradient is not (divided by k^2, see the ops crate's
        // pool tests), so it serves only inputs that need none.
        return Ok(x.max_pool2d(k)?);
    }
    let (n, c, h, w) = x.dims4()?;
    let oh = (h + 2 * padding - k) / stride + 1;
    let ow = (w + 2 * padding - k) / stride + 1;
    // Pad with a very negative value: zero-pad, then add -1e30 where the mask says "padding".
    // Adding exactly 0 inside keeps values (and gradients) bit-exact.
    let xp = if padding > 0 {
        let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
        let inside = ones
            .pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?;
        let neg = ((inside - 1.0)? * 1e30)?;
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
            .broadcast_add(&neg)?
    } else {
        x.clone()
    };
    // Pad further so that the strided reshape below fits.
    let need_h = (k - 1) + stride * oh;
    let need_w = (k - 1) + stride * ow;
    let ph = need_h.saturating_sub(xp.dim(2)?);
    let pw = need_w.saturating_sub(xp.dim(3)?);
    let xp = xp.pad_with_zeros(2, 0, ph)?.pad_with_zeros(3, 0, pw)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..k {
        for dx in 0..k {
            let v = xp
                .narrow(2, dy, stride * oh)?
                .narrow(3, dx, stride * ow)?
                .reshape((n, c, oh, stride, ow, stride))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, c, oh, ow))?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    Ok(out.expect("k >= 1"))
}

/// Global average pooling `(N, C, H, W) -> (N, C)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 4 {
        // One op with an explicit backward (selfsup-ops).
        return Ok(selfsup_ops::global_avg_pool(x)?);
    }
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}
