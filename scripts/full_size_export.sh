#!/usr/bin/env bash
# The full default SAM3 config (1008 px, 848 M parameters, random weights) through the real
# export path on this machine's CPU: wall time, peak RSS, file sizes and parity figures.
# Too slow for CI (tens of minutes on 2 cores); docs/export-full-size.md records a run.
# Usage: scripts/full_size_export.sh [OUT_DIR] [VERIFY_CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/full-bundle}
CASES=${2:-2}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$(dirname "$OUT")"
LOG="$OUT.log"
/usr/bin/time -v "$PY" -m export demo --preset full --out "$OUT" --verify-cases "$CASES" --skip-fp16-error-run 2>&1 | tee "$LOG"
du -b "$OUT"/* | tee -a "$LOG"
"$PY" -m export inspect "$OUT" | tee -a "$LOG"
