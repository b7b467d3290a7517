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
