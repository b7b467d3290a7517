//! An encoder and one head in a fresh `VarMap`: the body of every method whose loss compares
//! the projections of two views (SimCLR, Barlow Twins, VICReg, SupCon, pairs).

use candle_core::Tensor;
use candle_nn::VarMap;
use selfsup_models::heads::HeadBlock;
use selfsup_models::{build_encoder, seeded_var_builder, Encoder, EncoderKind, Head};

use selfsup_losses::PairLoss;

use selfsup_dist::Comm;

use crate::{gather, two_views, Error, Placement, Result, StepOutput};

pub(crate) struct EncoderHead {
    pub comm: Comm,
    pub varmap: VarMap,
    pub encoder: Box<dyn Encoder>,
    pub head: Head,
}

impl EncoderHead {
    /// `head` maps the encoder's feature dimension to the projection.
    pub fn new(
        kind: &EncoderKind,
        head: impl FnOnce(usize) -> Vec<HeadBlock>,
        seed: u64,
        at: &Placement,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, at.dtype, &at.device);
        let encoder = build_encoder(kind, vb.pp("encoder"))?;
        let head = Head::new(&head(encoder.feature_dim()), vb.pp("projection_head"))?;
        Ok(Self {
            comm: at.comm.clone(),
            varmap,
            encoder,
            head,
        })
    }

    /// Projections of both views, computed as one batch of `2N` (BatchNorm sees both views),
    /// then gathered from every rank (`(world * N, D)` each, rank 0's rows first), so the loss
    /// sees the global batch.
    pub fn project_pair(&self, v0: &Tensor, v1: &Tensor) -> Result<(Tensor, Tensor)> {
        let (z0, z1) = self.project_pair_local(v0, v1)?;
        Ok((gather(&self.comm, &z0)?, gather(&self.comm, &z1)?))
    }

    /// [`Self::project_pair`] without the gather: this rank's rows only.
    pub fn project_pair_local(&self, v0: &Tensor, v1: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = v0.dim(0)?;
        let x = Tensor::cat(&[v0, v1], 0)?;
        let z = self
            .head
            .forward_t(&self.encoder.forward_t(&x, true)?, true)?;
        Ok((z.narrow(0, 0, n)?, z.narrow(0, n, n)?))
    }
}

impl EncoderHead {
    /// The step of a method whose loss compares the views' projections (`what` names the
    /// method in errors). Two views: the loss of the pair. Multi-crop (two global views, then
    /// local views of one smaller size, see `selfsup_data::LocalCrops`):
    /// [`PairLoss::multi_crop_loss`], every global view against every other view. The local
    /// views go through the encoder as one batch of their own (their own BatchNorm statistics).
    pub fn pair_loss_step(
        &self,
        views: &[Tensor],
        what: &str,
        loss: &dyn PairLoss,
    ) -> Result<StepOutput> {
        let (globals, locals) = split_views(views, what)?;
        let (v0, v1) = globals;
        let (z0, z1) = self.project_pair(v0, v1)?;
        let zl = if locals.is_empty() {
            vec![]
        } else {
            self.project_locals(locals)?
        };
        Ok(StepOutput {
            loss: loss.multi_crop_loss(&z0, &z1, &zl)?,
            metrics: vec![],
            embeddings: z0.detach(),
        })
    }

    /// Projections of the local views, one forward of `k N` images, each view's rows gathered
    /// from every rank.
    pub fn project_locals(&self, locals: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = locals[0].dim(0)?;
        let x = Tensor::cat(locals, 0)?;
        let z = self
            .head
            .forward_t(&self.encoder.forward_t(&x, true)?, true)?;
        (0..locals.len())
            .map(|i| gather(&self.comm, &z.narrow(0, i * n, n)?))
            .collect()
    }
}

/// The two global views and the local views after them; an error naming the method if there
/// are fewer than two views or local views of different shapes.
pub(crate) fn split_views<'a>(
    views: &'a [Tensor],
    what: &str,
) -> Result<((&'a Tensor, &'a Tensor), &'a [Tensor])> {
    if views.len() < 2 {
        return two_views(views, what).map(|g| (g, &views[..0]));
    }
    let (g, locals) = views.split_at(2);
    if let Some(first) = locals.first() {
        if let Some(bad) = locals.iter().find(|l| l.dims() != first.dims()) {
            return Err(Error::Config(format!(
                "{what}: local views must share one shape, got {:?} and {:?}",
                first.dims(),
                bad.dims()
            )));
        }
    }
    Ok(((&g[0], &g[1]), locals))
}

/// Implement the `Method` accessors for a struct with an `inner: EncoderHead` field.
macro_rules! encoder_head_accessors {
    () => {
        fn encoder(&self) -> &dyn selfsup_models::Encoder {
            self.inner.encoder.as_ref()
        }

        fn varmap(&self) -> &candle_nn::VarMap {
            &self.inner.varmap
        }
    };
}
pub(crate) use encoder_head_accessors;
