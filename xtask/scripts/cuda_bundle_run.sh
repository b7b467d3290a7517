#!/usr/bin/env bash
# Runs the selfsup CUDA bundle (`cargo xtask cuda-bundle`) on a GPU machine that has an NVIDIA
# driver (580 series / CUDA 13.0 or newer) and CUDA 13 libraries from pip (cuBLAS, cuRAND,
# NVRTC, cuDNN: PyTorch's CUDA 13 wheels bring them), but no Rust toolchain.
#
#   ./run.sh            # everything below; logs in $OUT (default ./out)
#   STEPS="tests bench" ./run.sh
#
# 1. tests: the CUDA test binaries (CUDA vs CPU: encoders, losses, methods, trainer);
# 2. bench: `xtask bench train-step --device cuda:0` for small-cnn and resnet18;
# 3. run:   a short `cifar10-gpu` run (10 epochs) with its kNN curve, on data/ (a CIFAR-10 subset in the
#           official binary layout, shipped in the bundle when it was built with one) or on
#           $CIFAR10_DIR.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/out}
STEPS=${STEPS:-tests bench run}
mkdir -p "$OUT"

# The CUDA libraries of the Python environment's nvidia-* wheels.
PY=${SELFSUP_PYTHON:-python3}
NV=$("$PY" -c 'import nvidia, sys; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
if [ -n "$NV" ]; then
    LIBS=$(find "$NV" -maxdepth 3 -type d -name lib | tr '\n' ':')
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
fi
# Last: the bundle's cuRAND stand-in (draws fail loudly; selfsup draws on the CPU), for
# environments without cuRAND; a real one earlier on the path wins.
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$HERE/lib-fallback"
{
    echo "nvidia wheels: ${NV:-none found with $PY}"
    nvidia-smi || true
    echo "libraries the binaries need:"
    ldd "$HERE/bin/selfsup" | grep -E "cuda|cublas|curand|nvrtc|cudnn|not found"
} 2>&1 | tee "$OUT/environment.log"
if ldd "$HERE/bin/selfsup" | grep -q "not found"; then
    echo "error: libraries not found (see $OUT/environment.log); point SELFSUP_PYTHON at a Python with CUDA 13 wheels" >&2
    exit 3
fi

status=0
for step in $STEPS; do
    case $step in
    tests)
        for t in "$HERE"/tests/*; do
            echo "== $(basename "$t")"
            SELFSUP_TEST_DEVICE=cuda:0 "$t" --test-threads 1 2>&1 | tee "$OUT/test-$(basename "$t").log"
            [ "${PIPESTATUS[0]}" = 0 ] || status=1
        done
        ;;
    bench)
        for m in small-cnn resnet18; do
            "$HERE/bin/xtask" bench train-step --model "$m" --device cuda:0 --steps 10 2>&1 | tee "$OUT/bench-$m.log"
            [ "${PIPESTATUS[0]}" = 0 ] || status=1
        done
        ;;
    run)
        DATA=${CIFAR10_DIR:-$HERE/data}
        "$HERE/bin/selfsup" train --preset cifar10-gpu --epochs "${EPOCHS:-10}" --knn-every 1 \
            --data-dir "$DATA" --out "$OUT/run" 2>&1 | tee "$OUT/run.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        ;;
    esac
done
echo "logs in $OUT (exit $status)"
exit $status
