#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests, `dni bench --device cuda`, and the
# paper preset timed end to end on the GPU (the performance goal: <= 10 min on one H100).
# Uses the machine's own Python and CUDA build of torch (the project pins a CPU wheel);
# data from $DNI_DATA_DIR.
#
# The preset's store, tables and sitting records live in $WORK (default .cache/gpu-check),
# so a run stopped by a time limit resumes where it stopped when started again, and its
# wall time counts every sitting (provenance.json). The reports go to $OUT (default $WORK),
# a few small files: env.txt, tests.txt, bench.txt, preset.log, provenance.json,
# comparison.md.
#
#   DNI_DATA_DIR=/data/dni bash scripts/gpu-check.sh           # all three
#   JOBS=8 STEPS="bench preset" bash scripts/gpu-check.sh      # a choice, 8 workers
#   DEVICE=cpu PRESET=smoke bash scripts/gpu-check.sh          # a dry run without a GPU
#   STACK=1 STEPS=preset bash scripts/gpu-check.sh             # the preset without stacked training
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORK="$(mkdir -p "${WORK:-.cache/gpu-check}" && cd "${WORK:-.cache/gpu-check}" && pwd)"
OUT="$(mkdir -p "${OUT:-$WORK}" && cd "${OUT:-$WORK}" && pwd)"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-paper}"
JOBS="${JOBS:-4}"  # workers sharing the GPU: each one's small kernels leave it idle most of the time
STEPS="${STEPS:-tests bench preset}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DNI_CACHE_DIR="${DNI_CACHE_DIR:-$WORK/cache}" MPLCONFIGDIR="$WORK/matplotlib" TMPDIR="$WORK/tmp"
mkdir -p "$TMPDIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
for step in $STEPS; do
    case "$step" in
        tests) "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt" ;;
        bench) "$PY" -m dni bench --device "$DEVICE" 2>&1 | tee "$OUT/bench.txt" ;;
        preset)
            start=$(date +%s)
            "$PY" -m dni reproduce --preset "$PRESET" --device "$DEVICE" --jobs "$JOBS" ${STACK:+--stack "$STACK"} \
                --store "$WORK/store" --results "$WORK/results" --figures "$WORK/figures" 2>&1 | tee -a "$OUT/preset.log"
            echo "preset $PRESET on $DEVICE with $JOBS workers, stack ${STACK:-default}: $(( $(date +%s) - start )) s this sitting" | tee -a "$OUT/preset.log"
            if [ "$OUT" != "$WORK/results" ]; then
                cp "$WORK/results/provenance.json" "$WORK/results/comparison.md" "$OUT/" 2>/dev/null || true
            fi ;;
        *) echo "unknown step $step (tests, bench, preset)" >&2; exit 2 ;;
    esac
done
