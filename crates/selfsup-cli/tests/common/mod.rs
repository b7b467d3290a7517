//! Helpers shared by the CLI test binaries (`cli.rs`, `mpi.rs`).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The `selfsup` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_selfsup");

/// A command running the `selfsup` binary.
pub fn selfsup() -> Command {
    Command::new(BIN)
}

/// The command succeeded, or its output in the failure.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 48 striped images of 16x16 in two class folders.
pub fn write_folder(root: &Path) {
    let data = selfsup_data::synthetic::stripes(48, 16, 2, 5);
    for i in 0..48 {
        let item = selfsup_data::Dataset::get(&data, i).unwrap();
        let dir = root.join(format!("class{}", item.label.unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        item.image
            .to_rgb()
            .save(dir.join(format!("{i}.png")))
            .unwrap();
    }
}

/// A CIFAR-10 folder of 20 noise images per file (labels cycling 0-9), test image 0 equal to
/// training image 7.
pub fn write_small_cifar(root: &Path) {
    use selfsup_data::cifar;
    let b = root.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&b).unwrap();
    let per = 20;
    let mut rng = 1u32;
    let mut noise = || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        (rng >> 24) as u8
    };
    let mut first_train = Vec::new();
    for (fi, f) in cifar::TRAIN_FILES
        .iter()
        .chain([cifar::TEST_FILE].iter())
        .enumerate()
    {
        let labels: Vec<u8> = (0..per).map(|i| (i % 10) as u8).collect();
        let mut px: Vec<u8> = (0..per * 3072).map(|_| noise()).collect();
        if fi == 0 {
            first_train = px.clone();
        }
        if fi == 5 {
            // Test image 0 is training image 7 exactly.
            px[..3072].copy_from_slice(&first_train[7 * 3072..8 * 3072]);
        }
        cifar::write_batch(&b.join(f), &px, &labels).unwrap();
    }
    std::fs::write(b.join(cifar::META_FILE), cifar::CLASSES.join("\n")).unwrap();
}
