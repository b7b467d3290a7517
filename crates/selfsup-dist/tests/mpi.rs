//! The MPI communicator (the `mpi` feature): each test starts itself again under
//! `mpirun -np 3` and checks the collectives on real processes.
#![cfg(feature = "mpi")]

use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use selfsup_dist::{all_gather, all_gather_f32, all_reduce_sum, broadcast_f32, Comm, MpiComm};

/// Under mpirun: `Some(comm)`. Otherwise run `test` of this binary under `mpirun -np 3`,
/// assert that every rank passed, and return `None`.
fn under_mpirun(test: &str) -> Option<Comm> {
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        return Some(Arc::new(MpiComm::init().unwrap()));
    }
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3"])
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .output()
        .expect("mpirun (install openmpi-bin)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("1 passed").count(), 3, "{stdout}");
    None
}

#[test]
fn mpi_reduces_odd_and_empty_buffers_and_gathers_in_rank_order() {
    let Some(c) = under_mpirun("mpi_reduces_odd_and_empty_buffers_and_gathers_in_rank_order")
    else {
        return;
    };
    assert_eq!(c.world_size(), 3);
    let r = c.rank() as f32;
    for len in [0usize, 1, 7, 1001] {
        let mut b: Vec<f32> = (0..len).map(|i| i as f32 + 10.0 * r).collect();
        c.all_reduce_sum_f32(&mut b).unwrap();
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, v)| *v == 3.0 * i as f32 + 30.0));
    }
    assert_eq!(
        all_gather_f32(c.as_ref(), &[r, r + 0.5]).unwrap(),
        vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    );
    let mut b = vec![r; 5];
    broadcast_f32(c.as_ref(), &mut b, 1).unwrap();
    assert_eq!(b, vec![1.0; 5]);
    c.barrier().unwrap();
}

#[test]
fn mpi_gradients_of_gather_and_all_reduce() {
    let Some(c) = under_mpirun("mpi_gradients_of_gather_and_all_reduce") else {
        return;
    };
    let r = c.rank();
    let x = Var::from_vec(vec![r as f32 + 1.0; 2], (2, 1), &Device::Cpu).unwrap();
    let w = Tensor::new(&[[1f32], [2.], [3.], [4.], [5.], [6.]], &Device::Cpu).unwrap();
    let g = all_gather(&c, x.as_tensor()).unwrap();
    let loss = ((&g * &w).unwrap().sum_all().unwrap() * (r + 1) as f64).unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    // (1 + 2 + 3) * this rank's rows of w.
    let want: Vec<f32> = [1., 2., 3., 4., 5., 6.][2 * r..2 * r + 2]
        .iter()
        .map(|v| v * 6.0)
        .collect();
    assert_eq!(gx.to_vec1::<f32>().unwrap(), want);
    let y = all_reduce_sum(&c, x.as_tensor()).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![6.0, 6.0]
    );
    let g = (y * (r + 1) as f64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    assert_eq!(gx.to_vec1::<f32>().unwrap(), vec![6.0, 6.0]);
}
