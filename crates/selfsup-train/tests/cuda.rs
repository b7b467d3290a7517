//! The same computations on a CUDA device and on the CPU: encoders (train- and eval-mode
//! forward, every parameter's gradient), the losses (value and gradient), and a short training
//! run (every weight after it). They run when `SELFSUP_TEST_DEVICE=cuda:N` names a device of a
//! `--features cuda` build (the CUDA bundle's run.sh sets it); without the variable each test
//! says it did nothing. Tolerances: forward 1e-3 and gradients 1e-2 relative to the largest
//! value (cuBLAS and candle's CUDA kernels sum in other orders than the CPU kernels), a training
//! run 5% of the weights' total update.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use selfsup_data::{synthetic, Normalize};
use selfsup_models::{build_encoder, io, seeded_var_builder, EncoderKind};
use selfsup_train::setup::{build_trainer, RunData};
use selfsup_train::{parse_device, TrainConfig};

/// The device under test and its name, or `None` (test skipped) when `SELFSUP_TEST_DEVICE` is
/// unset or `cpu`.
fn device() -> Option<(Device, String)> {
    let name = std::env::var("SELFSUP_TEST_DEVICE").ok()?;
    if name == "cpu" {
        return None;
    }
    // Asked for a device that is not there: a failure, not a skip.
    let d = parse_device(&name).unwrap_or_else(|e| panic!("SELFSUP_TEST_DEVICE={name}: {e}"));
    Some((d, name))
}

fn skip(what: &str) {
    eprintln!("{what}: skipped (set SELFSUP_TEST_DEVICE=cuda:0 on a CUDA build with a GPU)");
}

/// max |a - b| / max(max |b|, 1e-6).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64))
        / scale
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

#[test]
fn encoders_match_the_cpu_forward_and_backward() {
    let Some((dev, _)) = device() else {
        return skip("encoders");
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["small-cnn", "resnet18", "resnet18-imagenet-w0.25"] {
        let kind: EncoderKind = name.parse().unwrap();
        let vm_c = candle_nn::VarMap::new();
        let enc_c = build_encoder(
            &kind,
            seeded_var_builder(&vm_c, 0, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let vm_g = candle_nn::VarMap::new();
        let enc_g = build_encoder(&kind, seeded_var_builder(&vm_g, 0, DType::F32, &dev)).unwrap();
        // The same weights on both (seeded init draws on the CPU; loaded to be sure).
        let file = dir.path().join(format!("{name}.safetensors"));
        io::save_varmap(&vm_c, "", &file).unwrap();
        io::load_varmap(&vm_g, "", &file).unwrap();
        let x = Tensor::randn(0f32, 1., (8, 3, 32, 32), &Device::Cpu).unwrap();
        let xg = x.to_device(&dev).unwrap();
        for train in [true, false] {
            let yc = enc_c.forward_t(&x, train).unwrap();
            let yg = enc_g.forward_t(&xg, train).unwrap();
            let r = rel(&cpu(&yg), &yc);
            eprintln!("{name} forward (train {train}): {r:.2e}");
            assert!(r < 1e-3, "{name} forward (train {train}) differs by {r:e}");
        }
        let gc = enc_c
            .forward_t(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let gg = enc_g
            .forward_t(&xg, true)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let (gc, gg) = (gc.backward().unwrap(), gg.backward().unwrap());
        let vars_c = vm_c.data().lock().unwrap();
        let vars_g = vm_g.data().lock().unwrap();
        let mut worst = 0f64;
        for (k, vc) in vars_c.iter() {
            let Some(a) = gc.get(vc.as_tensor()) else {
                continue;
            };
            let b = gg
                .get(vars_g[k].as_tensor())
                .expect("gradient on the GPU too");
            let r = rel(&cpu(b), a);
            worst = worst.max(r);
            assert!(r < 1e-2, "{name}: gradient of {k} differs by {r:e}");
        }
        eprintln!("{name} gradients: worst {worst:.2e}");
    }
}

#[test]
fn losses_match_the_cpu_value_and_gradient() {
    use selfsup_losses::*;
    let Some((dev, _)) = device() else {
        return skip("losses");
    };
    let a = Tensor::randn(0f32, 1., (64, 32), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1., (64, 32), &Device::Cpu).unwrap();
    let losses: Vec<(&str, Box<dyn PairLoss>)> = vec![
        ("nt_xent", Box::new(NtXent::new(0.5).unwrap())),
        ("info_nce", Box::new(InfoNce::new(0.2).unwrap())),
        ("negative_cosine", Box::new(NegativeCosine)),
        ("barlow_twins", Box::new(BarlowTwins::new(5e-3).unwrap())),
        ("vicreg", Box::new(Vicreg::new(25., 25., 1.).unwrap())),
    ];
    for (name, l) in &losses {
        let run = |d: &Device| {
            let va = Var::from_tensor(&a.to_device(d).unwrap()).unwrap();
            let v = l.loss(va.as_tensor(), &b.to_device(d).unwrap()).unwrap();
            let g = v.backward().unwrap();
            (cpu(&v), cpu(g.get(va.as_tensor()).unwrap()))
        };
        let (vc, gc) = run(&Device::Cpu);
        let (vg, gg) = run(&dev);
        let (rv, rg) = (rel(&vg, &vc), rel(&gg, &gc));
        eprintln!("{name}: value {rv:.2e}, gradient {rg:.2e}");
        assert!(
            rv < 1e-4 && rg < 1e-3,
            "{name}: value {rv:e}, gradient {rg:e}"
        );
    }
}

fn weights(t: &selfsup_train::Trainer) -> BTreeMap<String, Tensor> {
    t.method()
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), cpu(v.as_tensor())))
        .collect()
}

#[test]
fn a_training_run_matches_the_cpu() {
    let Some((_, name)) = device() else {
        return skip("training run");
    };
    let data = || RunData {
        train: Arc::new(synthetic::stripes(128, 16, 4, 1)),
        test: None,
        normalize: Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    };
    let run = |device: &str| {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            epochs: 2,
            batch_size: 32,
            image_size: 16,
            proj_hidden: 64,
            proj_out: 32,
            optimizer: selfsup_train::optim::OptimizerKind::Adamw,
            lr: 1e-3,
            weight_decay: 1e-4,
            warmup_epochs: 0.0,
            knn_every: 0,
            seed: 5,
            device: device.into(),
            out: dir.path().to_str().unwrap().into(),
            ..TrainConfig::default()
        };
        let mut t = build_trainer(&c, data()).unwrap();
        let init = weights(&t);
        let s = t.fit(None).unwrap();
        (init, weights(&t), s.last_loss.unwrap())
    };
    let (init, on_cpu, loss_cpu) = run("cpu");
    let (_, on_gpu, loss_gpu) = run(&name);
    eprintln!("last epoch's loss: cpu {loss_cpu:.5}, gpu {loss_gpu:.5}");
    assert!((loss_cpu - loss_gpu).abs() < 1e-2 * loss_cpu.abs().max(1.0));
    for (k, c) in &on_cpu {
        let g = &on_gpu[k];
        let update = (c - &init[k]).unwrap().sqr().unwrap().sum_all().unwrap();
        let diff = (g - c).unwrap().sqr().unwrap().sum_all().unwrap();
        let (u, d) = (
            update.to_scalar::<f32>().unwrap().sqrt(),
            diff.to_scalar::<f32>().unwrap().sqrt(),
        );
        if u > 0.0 {
            assert!(
                d <= 0.05 * u,
                "{k}: CUDA and CPU weights differ by {d} for an update of {u}"
            );
        }
    }
}
