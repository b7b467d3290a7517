#!/usr/bin/env bash
# Train every method with the same encoder and budget on CIFAR-10, then score each frozen
# encoder (kNN k=200 T=0.1 and a linear probe on the full train/test sets). Prints a Markdown
# table (docs/methods.md holds the measured one).
#
#   cargo build --release -p selfsup-cli
#   EPOCHS=1 SUBSET=10000 scripts/compare-methods.sh [METHOD ...]
#
# LR: override the preset's learning rate (runs go to a folder named after it).
# EPOCHS / SUBSET: the budget (default: 1 epoch over the first 10,000 training images; the
# cifar10-cpu preset's full budget is EPOCHS=10 SUBSET=0). Runs go to runs/methods-<budget>/
# (SELFSUP_RUNS: another folder). SELFSUP_BIN: the selfsup binary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SELFSUP_BIN:-target/release/selfsup}
EPOCHS=${EPOCHS:-1}
SUBSET=${SUBSET:-10000}
WARMUP=${WARMUP:-0.1}
LR=${LR:-}
ROOT=${SELFSUP_RUNS:-runs/methods-e${EPOCHS}-n${SUBSET}${LR:+-lr$LR}}
lr=()
if [ -n "$LR" ]; then lr=(--lr "$LR"); fi
METHODS=("$@")
if [ ${#METHODS[@]} -eq 0 ]; then
  METHODS=(simclr moco byol simsiam barlow vicreg supcon pairs rotation colorization simclr+rotation)
fi
mkdir -p "$ROOT"
echo "| method | kNN top-1 | linear top-1 | train wall (s) | images/s | final loss |"
echo "| --- | --- | --- | --- | --- | --- |"
for m in "${METHODS[@]}"; do
  out="$ROOT/${m/+/-}"
  # A stopped run continues from its last epoch; a finished one returns at once.
  resume=()
  # (state.json is written last: its presence marks a complete checkpoint, in any of the three
  # folders a save can leave; nothing is ever deleted here.)
  for c in checkpoint checkpoint.old .checkpoint.tmp; do
    if [ -f "$out/$c/state.json" ]; then resume=(--resume); fi
  done
  if ! "$BIN" train --preset cifar10-cpu --method "$m" --epochs "$EPOCHS" --train-subset "$SUBSET" \
    --warmup-epochs "$WARMUP" --knn-every 0 --threads 2 --out "$out" "${resume[@]}" "${lr[@]}" \
    >> "$out.log" 2>&1; then
    # A diverged run (NaN loss) or another failure: say so in the table and go on.
    echo "| $m | failed: $(tail -1 "$out.log" | sed 's/^error: //') | | | | |"
    continue
  fi
  "$BIN" eval linear --knn --checkpoint "$out" --threads 2 > "$out.eval" 2>> "$out.log"
  # Test-set top-1 of each (the linear-probe line also gives the train top-1, after it).
  knn=$(sed -n 's/^kNN.* test: top-1 \([0-9.]*%\).*/\1/p' "$out.eval")
  lin=$(sed -n 's/^linear probe.* test: top-1 \([0-9.]*%\).*/\1/p' "$out.eval")
  read -r wall ips loss < <(python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
ep = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"epoch"' in l]
wall = sum(e["wall_s"] for e in ep)
imgs = sum(e["wall_s"] * e["images_per_s"] for e in ep)
print(f"{wall:.0f} {imgs / wall:.0f} {ep[-1]['loss']:.4f}")
PY
)
  echo "| $m | $knn | $lin | $wall | $ips | $loss |"
done
