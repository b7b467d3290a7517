//! Checkpoints survive kills at every step of a save, twice in a row, and power losses that
//! leave empty files: the newest complete checkpoint is always found and verifies.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use selfsup_train::checkpoint::{self, SaveStep, TrainState};
use selfsup_train::Error;

fn state(step: u64) -> TrainState {
    TrainState {
        epoch: step as usize,
        step,
        method: "simclr".into(),
        encoder: "small-cnn".into(),
        feature_dim: 4,
        knn_top1: None,
        world_size: 1,
        files: Default::default(),
    }
}

fn tensors(step: u64) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    m.insert(
        "w".to_string(),
        Tensor::full(step as f32, (64, 64), &Device::Cpu).unwrap(),
    );
    m
}

/// Save step `step`, stopping (as a kill would) before hook call number `crash_at`.
/// Returns the steps reached, and whether the temporary folder was complete (synced).
fn save(run: &Path, step: u64, crash_at: Option<usize>) -> (Vec<SaveStep>, bool) {
    let mut seen = Vec::new();
    let mut complete = false;
    let r = checkpoint::save_with(
        run,
        &tensors(step),
        &tensors(step),
        &HashMap::new(),
        &state(step),
        "seed = 1\n",
        &mut |s| {
            if crash_at == Some(seen.len()) {
                return Err(Error::Config("killed".into()));
            }
            if matches!(
                s,
                SaveStep::Install | SaveStep::RetireCurrent | SaveStep::RemoveOld
            ) {
                complete = true;
            }
            seen.push(s);
            Ok(())
        },
    );
    if crash_at.is_none() {
        r.unwrap();
    }
    (seen, complete)
}

/// The newest checkpoint verifies and holds what its state says.
fn newest(run: &Path) -> u64 {
    let dir = checkpoint::latest(run).expect("a usable checkpoint");
    let st = checkpoint::verify(&dir).unwrap();
    let m = checkpoint::read_tensors(&dir.join("model.safetensors")).unwrap();
    let v: Vec<f32> = m["w"].flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        v.iter().all(|&x| x == st.step as f32),
        "{}: model of another step",
        dir.display()
    );
    st.step
}

#[test]
fn two_kills_in_a_row_at_every_step_of_a_save_never_lose_a_complete_checkpoint() {
    let points = {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), 1, None);
        save(d.path(), 2, None);
        save(d.path(), 3, None).0.len()
    };
    assert!(points >= 10, "{points} steps");
    for i in 0..points {
        for j in 0..=points {
            let d = tempfile::tempdir().unwrap();
            let run = d.path();
            save(run, 1, None);
            save(run, 2, None);
            // First kill during the save of step 3: step 2 (or 3, if it got complete) survives.
            let (_, done3) = save(run, 3, Some(i));
            let after_first = newest(run);
            assert!(
                after_first >= if done3 { 3 } else { 2 },
                "kill at {i}: {after_first}"
            );
            // The restart resumes from there and saves its next step; a second kill.
            let next = after_first + 1;
            let (_, done_next) = save(run, next, Some(j));
            let after_second = newest(run);
            let floor = if done_next { next } else { after_first };
            assert!(
                after_second >= floor,
                "kills at {i} then {j}: newest {after_second}, expected at least {floor}"
            );
            // And the run goes on normally.
            save(run, after_second + 1, None);
            assert_eq!(newest(run), after_second + 1);
        }
    }
}

#[test]
fn a_checkpoint_of_empty_files_is_passed_over_for_the_previous_one() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path();
    save(run, 1, None);
    save(run, 2, None);
    assert_eq!(newest(run), 2);
    // A power loss after the rename, before the data reached the disk.
    std::fs::write(run.join("checkpoint/model.safetensors"), b"").unwrap();
    assert!(checkpoint::verify(&run.join("checkpoint")).is_err());
    assert_eq!(newest(run), 1);
    // The next save keeps the good fallback and replaces the bad folder.
    save(run, 2, None);
    assert_eq!(newest(run), 2);
    assert_eq!(
        checkpoint::verify(&run.join("checkpoint.old"))
            .unwrap()
            .step,
        1
    );
    // A flipped byte is caught too.
    let p = run.join("checkpoint/encoder.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&p, b).unwrap();
    assert_eq!(newest(run), 1);
}
