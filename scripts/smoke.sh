#!/usr/bin/env bash
# The smoke reproduction: every stage of `dni reproduce` on a small budget (minutes).
# Writes into .cache/smoke so that the committed results/ and figures/ stay untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
DNI="${DNI:-.venv/bin/dni}"
OUT="${SMOKE_DIR:-.cache/smoke}"
"$DNI" describe --arch lstm --data rows
"$DNI" reproduce --preset smoke --results "$OUT/results" --figures "$OUT/figures" --device cpu
cat "$OUT/results/comparison.md"
