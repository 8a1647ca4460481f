#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests, `dni bench --device cuda`, and the
# paper preset timed end to end on the GPU (the performance goal: <= 10 min on one H100).
# Uses the machine's own Python and CUDA build of torch (the project pins a CPU wheel);
# data from $DNI_DATA_DIR. Everything goes to $OUT (default .cache/gpu-check): the test
# report, the bench output, and the preset's store, results (provenance.json holds its wall
# time), figures and log.
#
#   DNI_DATA_DIR=/data/dni bash scripts/gpu-check.sh           # all three
#   JOBS=8 STEPS="bench preset" bash scripts/gpu-check.sh      # a choice, 8 workers
#   DEVICE=cpu PRESET=smoke bash scripts/gpu-check.sh          # a dry run without a GPU
#   STACK=1 STEPS=preset bash scripts/gpu-check.sh             # the preset without stacked training
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="$(mkdir -p "${OUT:-.cache/gpu-check}" && cd "${OUT:-.cache/gpu-check}" && pwd)"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-paper}"
JOBS="${JOBS:-4}"  # workers sharing the GPU: each one's small kernels leave it idle most of the time
STEPS="${STEPS:-tests bench preset}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DNI_CACHE_DIR="${DNI_CACHE_DIR:-$OUT/cache}" MPLCONFIGDIR="$OUT/matplotlib" TMPDIR="$OUT/tmp"
mkdir -p "$TMPDIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
for step in $STEPS; do
    case "$step" in
        tests) "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt" ;;
        bench) "$PY" -m dni bench --device "$DEVICE" 2>&1 | tee "$OUT/bench.txt" ;;
        preset)
            start=$(date +%s)
            "$PY" -m dni reproduce --preset "$PRESET" --device "$DEVICE" --jobs "$JOBS" ${STACK:+--stack "$STACK"} \
                --store "$OUT/store" --results "$OUT/results" --figures "$OUT/figures" 2>&1 | tee "$OUT/preset.log"
            echo "preset $PRESET on $DEVICE with $JOBS workers, stack ${STACK:-default}: $(( $(date +%s) - start )) s" | tee -a "$OUT/preset.log" ;;
        *) echo "unknown step $step (tests, bench, preset)" >&2; exit 2 ;;
    esac
done
