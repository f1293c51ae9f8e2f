#!/usr/bin/env bash
# The exact commands behind benchmarks/RESULTS.md (CPU rows). Usage from the repo root:
#   bash benchmarks/reproduce_cpu.sh [WORKDIR]        (default /tmp/bench-work)
#   FULL_BUNDLE=build/full-bundle bash benchmarks/reproduce_cpu.sh [WORKDIR]   (adds the full-size row)
# Builds the tiny and SAM3-Small-shaped random checkpoints + bundles if missing (~10 min on 2
# cores), then runs the pipeline benchmark (with the transformers reference) and the HTTP
# benchmark for both (~2-3 min on a quiet 2-core machine). The
# markdown in RESULTS.md is these commands' output, re-rendered from the JSON with
#   python -m benchmarks report benchmarks/results/NAME.json --markdown benchmarks/results/NAME.md
set -euo pipefail
WORK=${1:-/tmp/bench-work}
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
NICE="nice -n 10"   # shared machine: stay behind interactive work
mkdir -p "$WORK" "$OUT"

for PRESET in tiny sam3_small; do
  if [ ! -f "$WORK/ckpt-$PRESET/model.safetensors" ]; then
    $NICE $PY -c "import sys; from tests.conftest import make_tiny_model; make_tiny_model(sys.argv[1]).save_pretrained(sys.argv[2])" \
      "$PRESET" "$WORK/ckpt-$PRESET"
  fi
  if [ ! -f "$WORK/bundle-$PRESET/manifest.json" ]; then
    $NICE $PY -m export build --checkpoint "$WORK/ckpt-$PRESET" --out "$WORK/bundle-$PRESET" --name "sam3-${PRESET#sam3_}-random" --verify-cases 1
  fi
done

run_pipeline() {  # NAME PRESET ITERATIONS PROMPTS...
  local name=$1 preset=$2 iterations=$3; shift 3
  $NICE $PY -m benchmarks pipeline --bundle "$WORK/bundle-$preset" --reference-checkpoint "$WORK/ckpt-$preset" \
    --iterations "$iterations" --warmup 1 --prompts "$@" \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png"
}
run_pipeline tiny-pipeline tiny 10 "a person" "a dog"
run_pipeline small-pipeline sam3_small 5 "a person" "a dog"
run_pipeline small-pipeline-1prompt sam3_small 5 "a person"
# Random weights keep no detection at 0.5: this run keeps 10 per prompt so the mask upsampling
# + RLE cost of postprocess is measured (no reference: it only concerns our postprocess).
$NICE $PY -m benchmarks pipeline --bundle "$WORK/bundle-sam3_small" --iterations 5 --warmup 1 --prompts "a person" \
  --score-threshold 0 --max-detections 10 --json "$OUT/small-pipeline-masks.json" \
  --markdown "$OUT/small-pipeline-masks.md" --plot "$OUT/small-pipeline-masks.png"

# Opt-in int8 CPU mode (python -m export quantize): the SAM3-Small bundle with an int8 image
# encoder, against the same fp32 reference checkpoint.
if [ ! -f "$WORK/bundle-sam3_small-int8/manifest.json" ]; then
  $NICE $PY -m export quantize "$WORK/bundle-sam3_small" --out "$WORK/bundle-sam3_small-int8"
fi
$NICE $PY -m benchmarks pipeline --bundle "$WORK/bundle-sam3_small-int8" --reference-checkpoint "$WORK/ckpt-sam3_small" \
  --iterations 5 --warmup 1 --prompts "a person" --json "$OUT/small-int8-pipeline-1prompt.json" \
  --markdown "$OUT/small-int8-pipeline-1prompt.md" --plot "$OUT/small-int8-pipeline-1prompt.png"

for PRESET in tiny sam3_small; do
  NAME=${PRESET%%_*}; [ "$PRESET" = sam3_small ] && NAME=small
  PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  SAM3_LOG_LEVEL=warning $NICE $PY -m server --bundle "$WORK/bundle-$PRESET" --host 127.0.0.1 --port "$PORT" \
    > "$WORK/server-$NAME.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break; sleep 1; done
  if [ "$NAME" = tiny ]; then N=40; else N=16; fi
  $NICE $PY -m benchmarks http --url "http://127.0.0.1:$PORT" --concurrency 1 --requests "$N" --cold-fraction 0.25 \
    --compare "$OUT/$NAME-pipeline.json" --compare-bundle "$WORK/bundle-$PRESET" --pairs 8 --json "$OUT/$NAME-http-c1.json" --markdown "$OUT/$NAME-http-c1.md" \
    --plot "$OUT/$NAME-http-c1.png"
  $NICE $PY -m benchmarks http --url "http://127.0.0.1:$PORT" --concurrency 4 --requests $((N * 2)) --cold-fraction 0.25 \
    --json "$OUT/$NAME-http-c4.json" --markdown "$OUT/$NAME-http-c4.md" --plot "$OUT/$NAME-http-c4.png"
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
  trap - EXIT
done

# Optional full-size row (1008 px, 848 M params, random weights): FULL_BUNDLE=path to a bundle
# built with `python -m export build` from a full-size checkpoint (see docs/export-full-size.md). One
# prompt, 2 iterations after 1 warm-up, no torch reference (the eager model would double the
# memory and the time). Measured: ~4 min on 2 cores, a cold call ~22 s, peak RSS 18808 MiB.
if [ -n "${FULL_BUNDLE:-}" ]; then
  $NICE $PY -m benchmarks pipeline --bundle "$FULL_BUNDLE" --iterations 2 --warmup 1 --prompts "a person" \
    --json "$OUT/full-pipeline.json" --markdown "$OUT/full-pipeline.md" --plot "$OUT/full-pipeline.png"
fi
