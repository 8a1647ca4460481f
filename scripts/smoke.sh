#!/usr/bin/env bash
# Smoke reproduction: train a small noise-injected LSTM and evaluate it under inference noise.
set -euo pipefail
cd "$(dirname "$0")/.."
DNI="${DNI:-.venv/bin/dni}"
STORE="${SMOKE_STORE:-.cache/smoke/store}"
mkdir -p "$(dirname "$STORE")"
"$DNI" describe --arch lstm --data rows
"$DNI" train --arch lstm --data rows --sigma-train 0.5 --epochs 3 --limit-train 6000 --val-size 1000 --store "$STORE" --device cpu
"$DNI" evaluate --store "$STORE" --sigma-val 0:1:0.25 --repeats 5 --limit-test 2000 --out .cache/smoke/results.csv --device cpu
