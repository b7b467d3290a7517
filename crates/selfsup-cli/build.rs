//! Records the git commit of the source tree, and whether it had uncommitted changes, for the
//! run records (`SELFSUP_GIT_COMMIT`, `SELFSUP_GIT_DIRTY`). Outside a git checkout (or without
//! git) the commit is `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    println!("cargo:rustc-env=SELFSUP_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=SELFSUP_GIT_DIRTY={dirty}");
    // Rerun when the commit, the index or any source changes (a rebuild follows then anyway).
    if let Some(top) = git(&["rev-parse", "--show-toplevel"]) {
        let gitdir = git(&["rev-parse", "--absolute-git-dir"]).unwrap_or_default();
        for p in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={gitdir}/{p}");
        }
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={gitdir}/{head_ref}");
        }
        for p in ["crates", "xtask", "Cargo.toml", "Cargo.lock"] {
            println!("cargo:rerun-if-changed={top}/{p}");
        }
    }
}
