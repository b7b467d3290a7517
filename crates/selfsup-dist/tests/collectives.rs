//! The collectives' maths on ranks that are threads ([`LocalGroup`]): reductions of odd-sized
//! and empty buffers, gathers in rank order, and the gradients of the differentiable ops.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use selfsup_dist::{
    all_gather, all_gather_detached, all_gather_f32, all_reduce_mean_f32, all_reduce_sum,
    broadcast_f32, Comm, Communicator, LocalGroup, Single,
};

/// Run `f(comm)` on each of `world` thread ranks; results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Comm) -> T + Sync) -> Vec<T> {
    let group = LocalGroup::new(world).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                let f = &f;
                s.spawn(move || f(Arc::new(g) as Comm))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_of_odd_sized_and_empty_buffers() {
    for len in [0usize, 1, 7, 1001] {
        let out = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let mut b: Vec<f32> = (0..len).map(|i| i as f32 + 10.0 * r).collect();
            c.all_reduce_sum_f32(&mut b).unwrap();
            let mut m: Vec<f32> = (0..len).map(|i| i as f32 * (r + 1.0)).collect();
            all_reduce_mean_f32(c.as_ref(), &mut m).unwrap();
            let mut d: Vec<f64> = vec![r as f64 + 0.5; len];
            c.all_reduce_sum_f64(&mut d).unwrap();
            (b, m, d)
        });
        for (b, m, d) in &out {
            assert_eq!(b.len(), len);
            for i in 0..len {
                assert_eq!(b[i], 3.0 * i as f32 + 30.0, "sum, len {len}, index {i}");
                assert_eq!(m[i], 2.0 * i as f32, "mean, len {len}, index {i}");
                assert_eq!(d[i], 4.5);
            }
        }
        // Every rank holds the same bits.
        assert!(out.iter().all(|o| o.0 == out[0].0 && o.1 == out[0].1));
    }
}

#[test]
fn gather_is_in_rank_order_and_broadcast_takes_the_root() {
    let out = on_ranks(3, |c| {
        let r = c.rank() as f32;
        let g = all_gather_f32(c.as_ref(), &[r, r + 0.5]).unwrap();
        let mut b = vec![r; 5];
        broadcast_f32(c.as_ref(), &mut b, 2).unwrap();
        let empty = all_gather_f32(c.as_ref(), &[]).unwrap();
        (g, b, empty)
    });
    for (g, b, e) in out {
        assert_eq!(g, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(b, vec![2.0; 5]);
        assert!(e.is_empty());
    }
}

#[test]
fn a_bad_root_or_buffer_is_an_error_not_a_hang() {
    let s = Single;
    assert!(s.broadcast_bytes(&mut [0u8; 4], 1).is_err());
    let mut out = [0u8; 3];
    assert!(s.all_gather_bytes(&[1, 2], &mut out).is_err());
    assert!(LocalGroup::new(0).is_err());
    assert!("nccl".parse::<selfsup_dist::Mode>().is_err());
    // Thread ranks whose all-reduce buffers differ in length: an error on every rank, and the
    // group still works afterwards (no rank left behind in a barrier).
    let out = on_ranks(3, |c| {
        let mut b = vec![1f32; 4 + c.rank()];
        let bad = c.all_reduce_sum_f32(&mut b).is_err();
        let mut ok = vec![c.rank() as f32; 5];
        c.all_reduce_sum_f32(&mut ok).unwrap();
        (bad, ok)
    });
    for (bad, ok) in out {
        assert!(bad);
        assert_eq!(ok, vec![3.0; 5]);
    }
}

/// Rank `r` computes `L_r = (r + 1) * sum(w * gather(x_r))`. The backward of the gather sums
/// the gathered gradient over ranks and keeps the rank's slice: `dL/dx_r = (sum_r' (r' + 1)) *
/// w[rows of r]`, not `(r + 1) * w[...]` (no sum) nor that over the world size (a reduce outside
/// autograd dividing by it).
#[test]
fn gather_backward_sums_over_ranks_and_keeps_this_ranks_rows() {
    let world = 3;
    let w: Vec<f32> = (0..world * 2 * 2)
        .map(|i| (i as f32 - 5.0) * 0.25)
        .collect();
    let out = on_ranks(world, |c| {
        let r = c.rank();
        let x = Var::from_vec(vec![r as f32 + 1.0; 4], (2, 2), &Device::Cpu).unwrap();
        let g = all_gather(&c, x.as_tensor()).unwrap();
        assert_eq!(g.dims(), &[6, 2]);
        let wt = Tensor::from_vec(w.clone(), (6, 2), &Device::Cpu).unwrap();
        let loss = ((&g * wt).unwrap().sum_all().unwrap() * (r + 1) as f64).unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        (
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            gx.to_vec1::<f32>().unwrap(),
        )
    });
    let weight_sum = (1..=world).sum::<usize>() as f32;
    for (r, (g, gx)) in out.iter().enumerate() {
        assert_eq!(
            g,
            &vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
        );
        let want: Vec<f32> = w[r * 4..(r + 1) * 4]
            .iter()
            .map(|v| v * weight_sum)
            .collect();
        assert_eq!(gx, &want, "rank {r}");
    }
}

/// `y = all_reduce_sum(x)`, `L_r = (r + 1) * sum(c * y)`: `dL/dx_r = sum_r' (r' + 1) * c`.
#[test]
fn all_reduce_backward_is_an_all_reduce() {
    let out = on_ranks(2, |comm| {
        let r = comm.rank();
        let x = Var::from_vec(vec![r as f64, 1.0, -2.0], 3, &Device::Cpu).unwrap();
        let y = all_reduce_sum(&comm, x.as_tensor()).unwrap();
        let c = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap();
        let loss = ((y.clone() * c).unwrap().sum_all().unwrap() * (r + 1) as f64).unwrap();
        let g = loss.backward().unwrap();
        (
            y.to_vec1::<f64>().unwrap(),
            g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
        )
    });
    for (y, g) in out {
        assert_eq!(y, vec![1.0, 2.0, -4.0]);
        assert_eq!(g, vec![3.0, 6.0, 9.0]);
    }
}

#[test]
fn detached_gather_keeps_integer_labels() {
    let out = on_ranks(2, |c| {
        let l = Tensor::new(&[c.rank() as u32 * 10 + 7, 3], &Device::Cpu).unwrap();
        all_gather_detached(&c, &l)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    });
    for o in out {
        assert_eq!(o, vec![7, 3, 17, 3]);
    }
}

#[test]
fn one_rank_changes_nothing() {
    let c: Comm = selfsup_dist::single();
    let x = Var::from_vec(vec![1f32, 2.0], 2, &Device::Cpu).unwrap();
    let g = all_gather(&c, x.as_tensor()).unwrap();
    let loss = (g * 3.0).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0, 3.0]
    );
    let mut b = vec![1.5f32; 3];
    all_reduce_mean_f32(c.as_ref(), &mut b).unwrap();
    assert_eq!(b, vec![1.5; 3]);
}
