#!/usr/bin/env bash
# Ablations of the cifar10-cpu-1h preset at a short, equal wall budget (about 10 minutes of
# training per row on the 2-core development machine): each row is the preset with one change,
# its epochs chosen so that the row fits the budget at its own speed (a whole schedule, warmup
# and cosine included, not a cut-off run). Each run ends with the kNN monitor (k=200, T=0.1,
# full test set, no test-time augmentation); then `selfsup eval knn --tta flip` scores the same
# checkpoint with flip-averaged features. Prints a Markdown table; docs/results.md holds the
# measured one. Run on a quiet machine: the wall times are part of the result.
#
#   cargo build --release -p selfsup-cli
#   scripts/cpu-1h-ablation.sh [ROW ...]
#
# Rows: proj1024 (the preset's recipe: VICReg, 1024-1024-1024 projector, batch 256), proj2048
# (VICReg's default 2048-2048-2048 projector), local4 / local2 (multi-crop: 4 or 2 local
# crops of 16 px), batch128 (batch 128, lr 0.1 by the LARS rule, twice the steps), barlow
# (Barlow Twins with the same 1024 projector and LARS), simclr (SimCLR with its cifar10-cpu
# head 512-128, t 0.5, SGD lr 0.12, weight decay 5e-4), lr04 (LARS lr 0.4), crop02 / crop035
# (global crops of 20-100% / 35-100% of the image instead of 8-100%), d512 (small-cnn with a
# 512-wide last layer: 512-d features), w15 (small-cnn 1.5 times as wide in every layer),
# crop24 / crop20 (global views of 24 / 20 px instead of 32: cheaper steps, more epochs;
# evaluation on whole 32 px images); v24s02 (the preset's views: 24 px from 20-100% of the
# image, 9 epochs), v20s02 (20 px from 20-100%, 11 epochs), v24s035 (24 px from 35-100%, 9
# epochs), and from v24s02: wd1e4 (weight decay 1e-4, solo-learn's VICReg setting, instead of
# 1e-6), lr01 (LARS lr 0.1); from v24s035: v24s05 (crops from 50-100%, 9 epochs), p2
# (small-cnn-p2: no max-pool after the third layer, 0.78 of the speed, so 7 epochs), w2
# (small-cnn-w2: twice as wide, 0.45 of the speed, so 4 epochs), proj512 (projector
# 512-512-512 instead of 1024-1024-1024), b512 (batch 512, LARS lr 0.4 by the linear rule);
# the last two take their epochs from SELFSUP_EPOCHS (set from their measured speed against
# v24s035's 9 epochs); from v24s035 (9 epochs): j05 / j15 (the colour jitter's strengths
# times 0.5 / 1.5), lr01s035 / lr025s035 / lr03s035 / lr04s035 (LARS lr 0.1 / 0.25 / 0.3 / 0.4
# instead of 0.2); from lr03s035: pw (the first convolution initialised with patch-whitening
# filters, `--patch-whitening true`). SELFSUP_RUNS: the runs'
# folder (runs/cpu-1h-ablation); SELFSUP_THREADS: threads of the run's one process (2; a run's
# numbers do not depend on it, so two rows can run side by side with 1 thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SELFSUP_BIN:-target/release/selfsup}
THREADS=${SELFSUP_THREADS:-2}
ROOT=${SELFSUP_RUNS:-runs/cpu-1h-ablation}
ROWS=("$@")
if [ ${#ROWS[@]} -eq 0 ]; then ROWS=(proj2048 proj1024 local4 local2 batch128); fi
mkdir -p "$ROOT"
echo "| row | epochs | train wall (s) | images/s | kNN top-1 | kNN top-1, flip TTA |"
echo "| --- | --- | --- | --- | --- | --- |"
for row in "${ROWS[@]}"; do
  # The ablations' base: the preset as it was before its global views changed (32 px views
  # from 8-100% of the image, a fixed length without a time budget) and before its learning
  # rate did (LARS lr 0.2). A row that changes the views sets size / scale itself, one that
  # changes the learning rate (or the batch, which does not rescale a given rate) lr.
  size=32 scale=0.08 lr=0.2
  case $row in
    proj2048) args=(--epochs 4 --proj-hidden 2048 --proj-out 2048) ;;
    proj1024) args=(--epochs 6) ;;
    local4) args=(--epochs 3 --local-crops 4) ;;
    local2) args=(--epochs 4 --local-crops 2) ;;
    batch128) args=(--epochs 6 --batch-size 128); lr=0.1 ;;
    barlow) args=(--epochs 6 --method barlow --proj-hidden 1024 --proj-out 1024) ;;
    simclr) args=(--epochs 8 --method simclr --optimizer sgd --weight-decay 5e-4); lr=0.12 ;;
    lr04) args=(--epochs 6); lr=0.4 ;;
    crop02) args=(--epochs 6); scale=0.2 ;;
    crop035) args=(--epochs 6); scale=0.35 ;;
    d512) args=(--epochs 6 --encoder small-cnn-d512) ;;
    w15) args=(--epochs 4 --encoder small-cnn-w1.5) ;;
    crop24) args=(--epochs 9); size=24 ;;
    crop20) args=(--epochs 11); size=20 ;;
    v24s02) args=(--epochs 9); size=24 scale=0.2 ;;
    v20s02) args=(--epochs 11); size=20 scale=0.2 ;;
    v24s035) args=(--epochs 9); size=24 scale=0.35 ;;
    wd1e4) args=(--epochs 9 --weight-decay 1e-4); size=24 scale=0.2 ;;
    lr01) args=(--epochs 9); size=24 scale=0.2 lr=0.1 ;;
    v24s05) args=(--epochs 9); size=24 scale=0.5 ;;
    p2) args=(--epochs 7 --encoder small-cnn-p2); size=24 scale=0.35 ;;
    w2) args=(--epochs 4 --encoder small-cnn-w2); size=24 scale=0.35 ;;
    proj512) args=(--epochs "${SELFSUP_EPOCHS:-10}" --proj-hidden 512 --proj-out 512); size=24 scale=0.35 ;;
    b512) args=(--epochs "${SELFSUP_EPOCHS:-9}" --batch-size 512); size=24 scale=0.35 lr=0.4 ;;
    j05) args=(--epochs 9 --jitter-scale 0.5); size=24 scale=0.35 ;;
    j15) args=(--epochs 9 --jitter-scale 1.5); size=24 scale=0.35 ;;
    lr01s035) args=(--epochs 9); size=24 scale=0.35 lr=0.1 ;;
    lr03s035) args=(--epochs 9); size=24 scale=0.35 lr=0.3 ;;
    lr04s035) args=(--epochs 9); size=24 scale=0.35 lr=0.4 ;;
    lr025s035) args=(--epochs 9); size=24 scale=0.35 lr=0.25 ;;
    pw) args=(--epochs 9 --patch-whitening true); size=24 scale=0.35 lr=0.3 ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  out=$ROOT/$row
  rm -rf "$out"
  start=$(date +%s)
  # One process (the preset's automatic ranks would take every core whatever THREADS says).
  # Without the preset's BatchNorm recalibration (the rows before it had none; `selfsup eval
  # knn --recalibrate-bn` scores a row's checkpoint with it).
  "$BIN" train --preset cifar10-cpu-1h --ranks 1 --threads "$THREADS" --knn-flip false --knn-every 100 \
    --bn-recalibrate false \
    --time-budget 0s --crop-size "$size" --crop-min-scale "$scale" --lr "$lr" \
    "${args[@]}" --out "$out" >"$out.log" 2>&1
  wall=$(( $(date +%s) - start ))
  knn=$(grep -o '"knn_top1":[0-9.]*' "$out/metrics.jsonl" | tail -1 | cut -d: -f2)
  ips=$(grep -o 'done: .*' "$out.log" | grep -o '[0-9]* images/s' | cut -d' ' -f1)
  flip=$("$BIN" eval knn --checkpoint "$out" --tta flip --threads "$THREADS" 2>/dev/null \
    | grep -o 'top-1 [0-9.]*%' | cut -d' ' -f2)
  printf '| %s | %s | %s | %s | %.2f%% | %s |\n' "$row" "${args[1]}" "$wall" "$ips" \
    "$(echo "$knn * 100" | bc -l)" "$flip"
done
