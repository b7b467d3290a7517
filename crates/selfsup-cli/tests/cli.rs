//! The `selfsup` binary end to end on a small image folder: train, resume, embed, errors.

mod common;

use common::{assert_ok, selfsup, write_folder, write_small_cifar};

#[test]
fn train_resume_embed_and_errors() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    write_folder(&imgs);
    let run = d.path().join("run");
    let common = |epochs: &str| {
        let mut c = selfsup();
        c.args([
            "train",
            "--dataset",
            &format!("folder:{}", imgs.display()),
            "--epochs",
            epochs,
            "--batch-size",
            "16",
            "--threads",
            "2",
            "--lr",
            "0.05",
        ])
        .args(["--out", run.to_str().unwrap()])
        .args(["--config", d.path().join("small.toml").to_str().unwrap()]);
        c
    };
    std::fs::write(
        d.path().join("small.toml"),
        "image_size = 16\nproj_hidden = 32\nproj_out = 16\nlog_every = 1\n",
    )
    .unwrap();
    let out = common("1").output().unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 1 epochs"));
    // A second run into the same folder without --resume is refused...
    let out = common("2").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    // ...and continues with it.
    let out = common("2").arg("--resume").output().unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 2 epochs"));
    // The curves as a picture; a half-written last line (a killed run) is skipped.
    let mut m = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut m, b"{\"kind\":\"step\",\"st").unwrap();
    drop(m);
    let out = selfsup()
        .args(["plot", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let png = image::open(run.join("metrics.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1500, 420));
    // Embeddings of the folder.
    let emb = d.path().join("emb.safetensors");
    let out = selfsup()
        .args([
            "embed",
            "--checkpoint",
            run.to_str().unwrap(),
            "--data",
            &format!("folder:{}", imgs.display()),
            "--out",
            emb.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let t = candle_core::safetensors::load(&emb, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["embeddings"].dims(), &[48, 256]);
    assert_eq!(t["labels"].dims(), &[48]);
    // Errors: one line, exit code 2.
    for args in [
        vec!["train", "--method", "nope", "--print-config"],
        vec!["train", "--encoder", "resnet7", "--print-config"],
        vec!["eval", "knn", "--checkpoint", "/nonexistent/run"],
        vec!["plot", "/nonexistent/run"],
        vec!["train", "--method", "rotation+simclr", "--print-config"],
        vec![
            "train",
            "--method",
            "moco",
            "--pair-loss",
            "x",
            "--batch-size",
            "8192",
            "--print-config",
        ],
    ] {
        let out = selfsup().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    // A checkpoint from another encoder.
    let out = selfsup()
        .args([
            "embed",
            "--checkpoint",
            run.join("checkpoint/encoder.safetensors").to_str().unwrap(),
            "--encoder",
            "resnet18",
            "--data",
            &format!("folder:{}", imgs.display()),
            "--out",
            emb.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another architecture"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Embeddings never overwrite the checkpoint they come from, nor land in a run folder.
    let weights = run.join("checkpoint/encoder.safetensors");
    let before = std::fs::read(&weights).unwrap();
    for target in [weights.clone(), run.join("emb.npy")] {
        let out = selfsup()
            .args(["embed", "--checkpoint", run.to_str().unwrap()])
            .args(["--data", &format!("folder:{}", imgs.display()), "--out"])
            .arg(&target)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", target.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("inside a run or checkpoint folder"));
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

#[test]
fn the_one_hour_preset_keeps_its_recipe() {
    let cfg = |args: &[&str]| {
        selfsup()
            .args(["train", "--preset", "cifar10-cpu-1h", "--print-config"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cfg(&[]);
    assert_ok(&out);
    let c = String::from_utf8(out.stdout).unwrap();
    for want in [
        "method = \"vicreg\"",
        "optimizer = \"lars\"",
        "lr = 0.25",
        "proj_hidden = 1024",
        "proj_out = 1024",
        "epochs = 60",
        "time_budget_s = 3600.0",
        "warmup_epochs = 1.0",
        "crop_size = 24",
        "crop_min_scale = 0.35",
        "knn_every = 10",
        "knn_flip = false",
        "knn_final_tta = \"flip-shift\"",
        "bn_recalibrate = true",
        "ranks = 0",
        "sync_bn = true",
    ] {
        assert!(c.contains(want), "{want} missing from\n{c}");
    }
    // Its own method named again keeps the recipe.
    let again = String::from_utf8(cfg(&["--method", "vicreg"]).stdout).unwrap();
    assert_eq!(again, c);
    // Its learning rate scales with a batch size given on top, unless one is given too.
    let b512 = String::from_utf8(cfg(&["--batch-size", "512"]).stdout).unwrap();
    assert!(b512.contains("\nlr = 0.5\n"), "{b512}");
    let given = String::from_utf8(cfg(&["--batch-size", "512", "--lr", "0.4"]).stdout).unwrap();
    assert!(given.contains("\nlr = 0.4\n"), "{given}");
    // Multi-crop on top; a method without multi-crop is refused with what to change, before
    // any work.
    let mc = cfg(&["--local-crops", "4"]);
    assert_ok(&mc);
    assert!(String::from_utf8_lossy(&mc.stdout).contains("local_crops = 4"));
    let moco = cfg(&["--method", "moco", "--local-crops", "2"]);
    assert_eq!(moco.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&moco.stderr).contains("--local-crops 0"));
    // A time budget is a duration; the global crop scale a fraction; nonsense exits 2.
    let b = cfg(&[
        "--time-budget",
        "55m",
        "--crop-min-scale",
        "0.3",
        "--jitter-scale",
        "0.5",
    ]);
    assert_ok(&b);
    let s = String::from_utf8_lossy(&b.stdout);
    assert!(
        s.contains("time_budget_s = 3300.0")
            && s.contains("crop_min_scale = 0.3")
            && s.contains("jitter_scale = 0.5"),
        "{s}"
    );
    for bad in [
        &["--time-budget", "soon"][..],
        &["--crop-min-scale", "1.5"],
        &["--jitter-scale", "7"],
        &["--jitter-scale", "-1"],
        &["--encoder", "small-cnn-w0"],
    ] {
        let o = cfg(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn methods_bring_their_defaults_and_flags_override_them() {
    let cfg = |args: &[&str]| {
        let out = selfsup()
            .args(["train", "--preset", "cifar10-cpu", "--print-config"])
            .args(args)
            .output()
            .unwrap();
        assert_ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let byol = cfg(&["--method", "byol"]);
    assert!(byol.contains("momentum_cosine = true") && byol.contains("proj_out = 256"));
    let moco = cfg(&["--method", "moco"]);
    assert!(moco.contains("temperature = 0.1") && moco.contains("queue_size = 4096"));
    let moco = cfg(&["--method", "moco", "--temperature", "0.3"]);
    assert!(moco.contains("temperature = 0.3"));
    let hybrid = cfg(&["--method", "simclr+rotation", "--aux-weight", "0.25"]);
    assert!(hybrid.contains("aux_weight = 0.25") && hybrid.contains("temperature = 0.5"));
    let rot = cfg(&["--method", "rotation"]);
    assert!(rot.contains("augment = \"crop_flip\""));
    // The preset's schedule stays.
    assert!(rot.contains("epochs = 10") && rot.contains("lr = 0.12"));
    // Barlow Twins and VICReg bring their papers' optimiser; flags still win.
    for m in ["barlow", "vicreg"] {
        let c = cfg(&["--method", m]);
        assert!(
            c.contains("optimizer = \"lars\"") && c.contains("lr = 0.2"),
            "{c}"
        );
    }
    let c = cfg(&["--method", "barlow", "--optimizer", "sgd", "--lr", "0.05"]);
    assert!(
        c.contains("optimizer = \"sgd\"") && c.contains("lr = 0.05"),
        "{c}"
    );
    // Their learning rate is 0.2 per 256 images: a batch size given on the command line or in
    // a config file scales it, unless a learning rate is given too.
    let c = cfg(&["--method", "vicreg", "--batch-size", "512"]);
    assert!(c.contains("lr = 0.4"), "{c}");
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("c.toml");
    std::fs::write(&file, "method = \"barlow\"\nbatch_size = 128\n").unwrap();
    let c = cfg(&["--config", file.to_str().unwrap()]);
    assert!(c.contains("lr = 0.1\n"), "{c}");
    std::fs::write(&file, "method = \"barlow\"\nbatch_size = 128\nlr = 0.3\n").unwrap();
    let c = cfg(&["--config", file.to_str().unwrap()]);
    assert!(c.contains("lr = 0.3\n"), "{c}");
    let c = cfg(&["--method", "vicreg", "--batch-size", "512", "--lr", "0.1"]);
    assert!(c.contains("lr = 0.1\n"), "{c}");
}

#[test]
fn a_hybrid_trains_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    write_folder(&imgs);
    let run = d.path().join("run");
    let cfg = d.path().join("small.toml");
    std::fs::write(&cfg, "image_size = 16\nlog_every = 1\n").unwrap();
    let out = selfsup()
        .args([
            "train",
            "--method",
            "simclr+rotation",
            "--aux-weight",
            "0.5",
            "--dataset",
            &format!("folder:{}", imgs.display()),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--threads",
            "2",
            "--proj-hidden",
            "32",
            "--proj-out",
            "16",
            "--out",
            run.to_str().unwrap(),
        ])
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        m.contains("\"aux_loss\"") && m.contains("\"rot_acc\""),
        "{m}"
    );
}

#[test]
fn neighbors_grid_and_pixel_knn_on_a_small_cifar() {
    let d = tempfile::tempdir().unwrap();
    write_small_cifar(d.path());
    let png = d.path().join("grid.png");
    let out = selfsup()
        .args([
            "neighbors",
            "--baseline",
            "pixels",
            "--query",
            "cifar10-test:0",
            "--k",
            "3",
        ])
        .args([
            "--data-dir",
            d.path().to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": #7 horse (1.000)"), "{stdout}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 128 + 6 * 4, 128 + 8));
    let out = selfsup()
        .args([
            "eval",
            "knn",
            "--baseline",
            "pixels",
            "--k",
            "5",
            "--data-dir",
            d.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("top-1"));
    // Low-label protocol on the same tiny data: the table goes to stdout and OUT/results.md.
    let ll = d.path().join("ll");
    let out = selfsup()
        .args([
            "eval",
            "low-label",
            "--baseline",
            "random",
            "--encoder",
            "small-cnn",
        ])
        .args(["--fractions", "0.5", "--epochs", "1", "--batch-size", "10"])
        .args([
            "--data-dir",
            d.path().to_str().unwrap(),
            "--out",
            ll.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| 50% (50 images) |"), "{stdout}");
    let saved = std::fs::read_to_string(ll.join("results.md")).unwrap();
    assert_eq!(saved, stdout);
}

/// `selfsup embed` feeds a colorization encoder the grey images it trained on (`--input auto`),
/// colour on request, and any other run colour unless told `--input grey`.
#[test]
fn a_colorization_run_is_embedded_from_grey_images() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    write_folder(&imgs);
    let run = d.path().join("run");
    let cfg = d.path().join("small.toml");
    std::fs::write(&cfg, "image_size = 16\nproj_hidden = 32\n").unwrap();
    let out = selfsup()
        .args(["train", "--method", "colorization", "--epochs", "1"])
        .args(["--dataset", &format!("folder:{}", imgs.display())])
        .args(["--batch-size", "16", "--threads", "2", "--out"])
        .args([run.to_str().unwrap(), "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let embed = |name: &str, input: &str| {
        let emb = d.path().join(name);
        let out = selfsup()
            .args(["embed", "--checkpoint", run.to_str().unwrap(), "--data"])
            .args([&format!("folder:{}", imgs.display()), "--out"])
            .arg(&emb)
            .args(["--input", input])
            .output()
            .unwrap();
        assert_ok(&out);
        candle_core::safetensors::load(&emb, &candle_core::Device::Cpu).unwrap()["embeddings"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let grey = embed("grey.safetensors", "auto");
    assert_eq!(grey, embed("grey2.safetensors", "grey"));
    let colour = embed("colour.safetensors", "colour");
    assert_ne!(grey, colour);
    let toml = run.join("checkpoint/config.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("method = \"colorization\""), "{text}");
    std::fs::write(&toml, text.replace("\"colorization\"", "\"rotation\"")).unwrap();
    assert_eq!(colour, embed("colour2.safetensors", "auto"));
    assert_eq!(grey, embed("grey3.safetensors", "grey"));
}

/// A binary built without MPI refuses to train alone when a launcher started several ranks
/// (each would write the same run folder), and when `--dist mpi` asks for MPI.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_an_mpi_launch_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let out = selfsup()
        .args(["train", "--out", run.to_str().unwrap()])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("started 2 ranks") && err.contains("--features mpi"),
        "{err}"
    );
    let out = selfsup()
        .args(["train", "--dist", "mpi", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("built without MPI"));
    let out = selfsup()
        .args(["train", "--dist", "nccl", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto, single or mpi"));
    assert!(!run.exists(), "nothing is written");
}

#[test]
fn resume_with_nothing_to_resume_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    write_folder(&imgs);
    let run = d.path().join("empty-run");
    let out = selfsup()
        .args(["train", "--dataset", &format!("folder:{}", imgs.display())])
        .args(["--epochs", "1", "--batch-size", "16", "--resume"])
        .args(["--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no checkpoint to resume"), "{err}");
    assert!(!run.join("metrics.jsonl").exists() && !run.join("checkpoint").exists());
}

#[test]
fn one_run_per_folder_and_a_signal_stops_it_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    write_folder(&imgs);
    let run = d.path().join("run");
    std::fs::write(
        d.path().join("small.toml"),
        "image_size = 16\nproj_hidden = 32\nproj_out = 16\nknn_every = 0\n",
    )
    .unwrap();
    let train = |epochs: &str| {
        let mut c = selfsup();
        c.args(["train", "--dataset", &format!("folder:{}", imgs.display())])
            .args(["--epochs", epochs, "--batch-size", "16", "--threads", "1"])
            .args(["--out", run.to_str().unwrap()])
            .args(["--config", d.path().join("small.toml").to_str().unwrap()]);
        c
    };
    let mut first = train("100000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !run.join("checkpoint/state.json").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A second process into the same folder is refused, whatever its flags.
    for extra in [&[][..], &["--resume"][..]] {
        let out = train("3").args(extra).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use by another selfsup process"), "{err}");
        assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    }
    // SIGTERM: the run stops between two steps, says how to resume, and leaves no temporary
    // folder; the code is the shell's for a signal.
    std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    let t1 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed().as_secs() < 30,
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("--resume"),
        "{err}"
    );
    assert!(!run.join(".checkpoint.tmp").exists());
    // The lock went with the process: the run resumes.
    let out = train("100000")
        .args(["--resume", "--stop-after", "1"])
        .output()
        .unwrap();
    assert_ok(&out);
    // A folder holding anything else is not a run folder.
    let other = d.path().join("photos");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("holiday.jpg"), b"not mine").unwrap();
    let out = selfsup()
        .args(["train", "--dataset", &format!("folder:{}", imgs.display())])
        .args(["--out", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a selfsup run"));
    assert_eq!(
        std::fs::read(other.join("holiday.jpg")).unwrap(),
        b"not mine"
    );
}

#[test]
fn plot_draws_or_skips_any_number() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("wild");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        concat!(
            "{\"kind\":\"step\",\"step\":1,\"loss\":1e308,\"embed_std\":0.1}\n",
            "{\"kind\":\"step\",\"step\":2,\"loss\":-1e308,\"embed_std\":-1e300}\n",
            "{\"kind\":\"step\",\"step\":3,\"loss\":2.5,\"embed_std\":0.05}\n",
            "{\"kind\":\"step\",\"step\":4,\"loss\":1e14,\"embed_std\":0.05}\n",
            "{\"kind\":\"epoch\",\"epoch\":1,\"knn_top1\":1e308}\n",
        ),
    )
    .unwrap();
    let mut child = selfsup()
        .args(["plot", run.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > 30 {
            child.kill().unwrap();
            panic!("plot still running after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 4 value(s)"));
    assert!(run.join("metrics.png").is_file());
}

#[test]
fn requests_beyond_the_machine_are_refused_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.toml");
    std::fs::write(&big, "image_size = 100000\n").unwrap();
    let run = d.path().join("run");
    for (args, says) in [
        (vec!["--threads", "100000"], "more than this machine's"),
        (
            vec!["--encoder", "resnet18-w99999999999"],
            "GiB per process",
        ),
        (vec!["--config", big.to_str().unwrap()], "image size 100000"),
    ] {
        let t0 = std::time::Instant::now();
        let out = selfsup()
            .args(["train", "--dataset", "folder:/nonexistent", "--out"])
            .arg(&run)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(t0.elapsed().as_secs() < 10);
        assert!(!run.exists());
    }
}

#[test]
fn resume_keeps_the_run_meaning_and_works_from_another_directory() {
    let d = tempfile::tempdir().unwrap();
    write_folder(&d.path().join("imgs"));
    std::fs::write(
        d.path().join("small.toml"),
        "image_size = 16\nproj_hidden = 32\nproj_out = 16\nknn_every = 0\n",
    )
    .unwrap();
    // Relative paths, from the temporary folder.
    let out = selfsup()
        .current_dir(d.path())
        .args([
            "train",
            "--dataset",
            "folder:imgs",
            "--config",
            "small.toml",
        ])
        .args([
            "--epochs",
            "2",
            "--stop-after",
            "1",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ])
        .args(["--out", "run"])
        .output()
        .unwrap();
    assert_ok(&out);
    let run = d.path().join("run");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains(&format!("folder:{}", d.path().join("imgs").display())),
        "{saved}"
    );
    // Flags that would make it another run are refused, with one line.
    for (flag, value) in [
        ("--batch-size", "8"),
        ("--method", "byol"),
        ("--seed", "99"),
        ("--encoder", "resnet18"),
    ] {
        let out = selfsup()
            .args([
                "train",
                "--resume",
                "--out",
                run.to_str().unwrap(),
                flag,
                value,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is a new run") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    // From another directory, with nothing but --resume and --out: the run's own config.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = selfsup()
        .current_dir(elsewhere.path())
        .args(["train", "--resume", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 2 epochs"));
}

#[test]
fn low_label_replaces_only_its_own_earlier_runs() {
    let d = tempfile::tempdir().unwrap();
    write_small_cifar(d.path());
    let out_dir = d.path().join("ll");
    let low_label = || {
        selfsup()
            .args([
                "eval",
                "low-label",
                "--baseline",
                "random",
                "--encoder",
                "small-cnn",
            ])
            .args(["--fractions", "0.1", "--epochs", "1", "--batch-size", "4"])
            .args(["--data-dir", d.path().to_str().unwrap()])
            .args(["--out", out_dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // Something else in the folder a run would take: refused, kept.
    let taken = out_dir.join("scratch-10pct");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), b"mine").unwrap();
    let out = low_label();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a selfsup run"));
    assert_eq!(std::fs::read(taken.join("notes.txt")).unwrap(), b"mine");
    // Its own earlier runs are replaced, and it says so.
    std::fs::remove_dir_all(&taken).unwrap();
    assert_ok(&low_label());
    let out = low_label();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("replacing the earlier low-label run"));
}

/// scripts/compare-methods.sh resumes a run from whichever complete checkpoint folder a save
/// left (here only `checkpoint.old`), and deletes nothing.
#[test]
fn compare_methods_never_deletes_a_resumable_run() {
    let d = tempfile::tempdir().unwrap();
    let runs = d.path().join("runs");
    let run = runs.join("simclr");
    std::fs::create_dir_all(run.join("checkpoint.old")).unwrap();
    std::fs::write(run.join("checkpoint.old/state.json"), b"{}").unwrap();
    std::fs::create_dir_all(runs.join("moco")).unwrap();
    std::fs::write(runs.join("moco/metrics.jsonl"), b"").unwrap();
    // A stand-in binary that records its arguments and fails (the script then reports the
    // failure and goes on).
    let fake = d.path().join("fake-selfsup");
    let log = d.path().join("calls.log");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", log.display()),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", fake.to_str().unwrap()])
        .status()
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/compare-methods.sh"
    );
    let out = std::process::Command::new("bash")
        .args([script, "simclr", "moco"])
        .env("SELFSUP_BIN", &fake)
        .env("SELFSUP_RUNS", &runs)
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        run.join("checkpoint.old/state.json").is_file(),
        "the run was deleted"
    );
    assert!(runs.join("moco/metrics.jsonl").is_file());
    let calls = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "{calls}");
    assert!(lines[0].contains("--method simclr") && lines[0].contains("--resume"));
    assert!(lines[1].contains("--method moco") && !lines[1].contains("--resume"));
}
