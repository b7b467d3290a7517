//! Data-parallel training equals one process: 2 ranks x B/2 (embeddings gathered, BatchNorm
//! synchronised) give the same losses and the same weights after several steps as 1 rank x B.
//! The ranks here are threads of one process over `selfsup_dist::LocalGroup` (the same trainer
//! code paths as MPI; the MPI runs are in the CLI tests).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use selfsup_data::{synthetic, Normalize};
use selfsup_dist::{Comm, LocalGroup};
use selfsup_train::optim::OptimizerKind;
use selfsup_train::setup::{build_trainer_dist, RunData};
use selfsup_train::TrainConfig;

fn data() -> RunData {
    RunData {
        train: Arc::new(synthetic::stripes(64, 16, 4, 1)),
        test: None,
        normalize: Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    }
}

fn cfg(method: &str, out: &std::path::Path, sync_bn: bool) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.apply_method_defaults(method);
    c.proj_hidden = 64;
    c.proj_out = 32;
    c.pred_hidden = 32;
    c.queue_size = 48;
    c.epochs = 2;
    c.batch_size = 16;
    c.image_size = 16;
    if c.optimizer != OptimizerKind::Lars {
        c.optimizer = OptimizerKind::Sgd;
        c.lr = 0.05;
    }
    c.warmup_epochs = 0.0;
    c.knn_every = 0;
    c.seed = 11;
    c.threads = 1;
    c.log_every = 1;
    c.sync_bn = sync_bn;
    c.out = out.to_str().unwrap().to_string();
    c
}

struct Outcome {
    /// Loss of every step, as rank 0 logged it.
    losses: Vec<f64>,
    /// Every variable of every rank after training.
    weights: Vec<BTreeMap<String, Tensor>>,
}

fn vars(t: &selfsup_train::Trainer) -> BTreeMap<String, Tensor> {
    t.method()
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn logged_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// `f(comm)` on each of `world` ranks (threads over a `LocalGroup`; one rank: `Single`), the
/// results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Comm) -> T + Sync) -> Vec<T> {
    let comms: Vec<Comm> = if world == 1 {
        vec![selfsup_dist::single()]
    } else {
        LocalGroup::new(world)
            .unwrap()
            .into_iter()
            .map(|g| Arc::new(g) as Comm)
            .collect()
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || f(comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Train `method` with `world` ranks (threads), the global batch fixed.
fn run(method: &str, world: usize, sync_bn: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(method, dir.path(), sync_bn);
    let weights = on_ranks(world, |comm| {
        let mut t = build_trainer_dist(&c, data(), comm).unwrap();
        t.fit(None).unwrap();
        vars(&t)
    });
    Outcome {
        losses: logged_losses(dir.path()),
        weights,
    }
}

/// `||a - b|| / max(||a - init||, 1e-3 ||a||)`: how far two runs ended apart, measured against
/// how far training moved the tensor (or, for a tensor training hardly moves, such as the bias
/// of a layer that a BatchNorm follows, whose gradient is zero up to rounding, against its size).
fn deviation(a: &Tensor, b: &Tensor, init: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b, i) = (f(a), f(b), f(init));
    let norm = |t: Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let scale = norm((&a - &i).unwrap()).max(1e-3 * norm(a.clone()));
    if scale == 0.0 {
        return norm((&a - &b).unwrap());
    }
    norm((&a - &b).unwrap()) / scale
}

/// Tolerance of [`deviation`] (f32). The ranks sum gradients in another order (per-rank partial
/// sums, then the all-reduce) and the synchronised BatchNorm takes the composed path instead of
/// the fused kernel, so values differ in the last bits (about 1e-6 of the update after several
/// steps). Rarely, such a difference flips a max-pool near-tie or a ReLU at zero and sends one
/// position's gradient elsewhere, about 1e-3 of a tensor's update. A wrong gather, a gradient
/// scaled by 1/world or per-rank statistics move tensors by 1e-1 and more.
const TOL: f64 = 1e-2;

fn two_ranks_equal_one(method: &str) {
    let init = run_init(method);
    let one = run(method, 1, true);
    let two = run(method, 2, true);
    assert_eq!(one.losses.len(), 8, "{method}: 4 steps x 2 epochs");
    assert_eq!(one.losses.len(), two.losses.len());
    for (i, (a, b)) in one.losses.iter().zip(&two.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "{method}: step {i} loss {a} (1 rank) vs {b} (2 ranks)"
        );
    }
    // Every rank holds the same bits of every variable (parameters, buffers, targets, queue).
    for (name, t) in &two.weights[0] {
        let other = &two.weights[1][name];
        let same = (t - other)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(
            same.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0,
            "{method}: {name} differs between the ranks"
        );
    }
    // ... and the same values as one process with the whole batch.
    let mut worst = (0.0, String::new());
    for (name, t) in &one.weights[0] {
        let r = deviation(t, &two.weights[0][name], &init[name]);
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    eprintln!("{method}: worst deviation {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 < TOL,
        "{method}: {} deviates by {:.2e} of its update between 1 rank and 2 ranks",
        worst.1,
        worst.0
    );
}

/// The variables before any step.
fn run_init(method: &str) -> BTreeMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(method, dir.path(), true);
    let t = build_trainer_dist(&c, data(), selfsup_dist::single()).unwrap();
    vars(&t)
}

#[test]
fn simclr_on_two_ranks_equals_one_process() {
    two_ranks_equal_one("simclr");
}

#[test]
fn moco_on_two_ranks_equals_one_process_queue_included() {
    two_ranks_equal_one("moco");
}

#[test]
fn byol_on_two_ranks_equals_one_process() {
    two_ranks_equal_one("byol");
}

#[test]
fn barlow_on_two_ranks_equals_one_process() {
    two_ranks_equal_one("barlow");
}

#[test]
fn vicreg_on_two_ranks_equals_one_process() {
    two_ranks_equal_one("vicreg");
}

#[test]
fn supcon_on_two_ranks_equals_one_process() {
    two_ranks_equal_one("supcon");
}

#[test]
fn without_sync_bn_ranks_stay_identical_but_differ_from_one_process() {
    // Per-rank BatchNorm (PyTorch DDP's default): each rank normalises its own half batch, so
    // the run is not the one-process run, but every rank still holds the same weights, and
    // the running statistics are rank 0's.
    let one = run("simclr", 1, false);
    let two = run("simclr", 2, false);
    for (name, t) in &two.weights[0] {
        let d = (t - &two.weights[1][name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(
            d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            0.0,
            "{name} differs between ranks"
        );
    }
    let init = run_init("simclr");
    let worst = one.weights[0]
        .iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .map(|(n, t)| deviation(t, &two.weights[0][n], &init[n]))
        .fold(0.0, f64::max);
    eprintln!("per-rank BatchNorm: worst deviation {worst:.2e}");
    assert!(
        worst > 10.0 * TOL,
        "per-rank BatchNorm changed nothing ({worst:.2e})"
    );
}

#[test]
fn ranks_read_disjoint_shards_that_cover_each_global_batch() {
    let ds: Arc<dyn selfsup_data::Dataset> = Arc::new(synthetic::stripes(50, 8, 3, 1));
    let views = selfsup_data::preset_views(
        selfsup_data::Preset::None,
        8,
        Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    );
    let loader = |shard| {
        selfsup_data::Loader::new(
            ds.clone(),
            views.clone(),
            selfsup_data::LoaderConfig {
                batch_size: 12,
                seed: 5,
                threads: 1,
                shard,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let whole: Vec<Vec<usize>> = loader((0, 1))
        .epoch(3)
        .map(|b| b.unwrap().indices)
        .collect();
    let parts: Vec<Vec<Vec<usize>>> = (0..3)
        .map(|r| {
            loader((r, 3))
                .epoch(3)
                .map(|b| b.unwrap().indices)
                .collect()
        })
        .collect();
    assert_eq!(whole.len(), 4, "50 images, batch 12, drop_last");
    for (bi, batch) in whole.iter().enumerate() {
        let joined: Vec<usize> = parts.iter().flat_map(|p| p[bi].clone()).collect();
        assert_eq!(
            &joined, batch,
            "batch {bi}: rank shards in rank order = the global batch"
        );
        assert!(parts.iter().all(|p| p[bi].len() == 4));
    }
    // A batch that does not split evenly is refused.
    let bad = selfsup_data::Loader::new(
        ds.clone(),
        views.clone(),
        selfsup_data::LoaderConfig {
            batch_size: 10,
            shard: (0, 3),
            ..Default::default()
        },
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("multiple of the 3 ranks"));
}

#[test]
fn the_moco_queue_takes_every_ranks_keys() {
    // lightly issue 1018: a queue fed only this rank's keys advances by B / world per step and
    // differs between ranks. Here it advances by the global batch and is the same everywhere.
    let two = run("moco", 2, false);
    for w in &two.weights {
        let ptr = w["state.queue_ptr"].to_vec1::<f32>().unwrap()[0];
        // 8 steps x 16 keys in a queue of 48.
        assert_eq!(ptr as usize, (8 * 16) % 48);
    }
    let (q0, q1) = (
        &two.weights[0]["state.queue"],
        &two.weights[1]["state.queue"],
    );
    let d = (q0 - q1)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn the_knn_monitor_on_three_ranks_equals_one_process() {
    // Bank and test sets that do not split evenly: shares of 22/22/21 and 11/11/11 + 1.
    let data = || RunData {
        train: Arc::new(synthetic::stripes(65, 16, 4, 1)),
        test: Some(Arc::new(synthetic::stripes(34, 16, 4, 2))),
        normalize: Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg("simclr", dir.path(), false);
    c.knn_every = 1;
    c.knn_k = 10;
    c.batch_size = 15;
    let one = build_trainer_dist(&c, data(), selfsup_dist::single())
        .unwrap()
        .knn_eval()
        .unwrap()
        .unwrap();
    let three = on_ranks(3, |comm| {
        build_trainer_dist(&c, data(), comm)
            .unwrap()
            .knn_eval()
            .unwrap()
    });
    assert_eq!(
        three[0],
        Some(one),
        "rank 0 votes with every rank's features"
    );
    assert_eq!(three[1], None);
    assert_eq!(three[2], None);
    let shares: Vec<_> = (0..3)
        .map(|r| selfsup_train::shard_range(65, r, 3))
        .collect();
    assert_eq!(shares, vec![0..22, 22..44, 44..65]);
}

#[test]
fn a_run_stopped_on_two_ranks_resumes_in_one_process() {
    // Same global batch, order and crops for any rank count: with synchronised BatchNorm, an
    // epoch on 2 ranks then an epoch in one process is the uninterrupted one-process run.
    let init = run_init("simclr");
    let straight = run("simclr", 1, true);
    let dir = tempfile::tempdir().unwrap();
    let c = cfg("simclr", dir.path(), true);
    on_ranks(2, |comm| {
        let mut t = build_trainer_dist(&c, data(), comm).unwrap();
        assert_eq!(t.fit(Some(1)).unwrap().epochs, 1);
    });
    let mut t = build_trainer_dist(&c, data(), selfsup_dist::single()).unwrap();
    assert!(t.resume().unwrap());
    assert_eq!(t.epoch(), 1);
    assert_eq!(t.fit(None).unwrap().epochs, 2);
    let resumed = vars(&t);
    let losses = logged_losses(dir.path());
    assert_eq!(losses.len(), straight.losses.len());
    for (a, b) in straight.losses.iter().zip(&losses) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    for (name, t) in &straight.weights[0] {
        let d = deviation(t, &resumed[name], &init[name]);
        assert!(d < TOL, "{name} deviates by {d:.2e}");
    }
}
