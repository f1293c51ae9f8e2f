#!/usr/bin/env bash
# The commands behind benchmarks/RESULTS.md "Triton": the same server, local ONNX Runtime vs
# --backend triton (a real tritonserver from the nvidia-pytriton wheel, the SAM3-Small-shaped
# bundle's parts on ONNX Runtime in its Python backend), at 1 and 8 concurrent clients, one run;
# then the transfer cost of a warm call at SAM3-Small and full-size shapes. Usage, repo root:
#   bash benchmarks/reproduce_triton.sh [WORKDIR]      (default /tmp/bench-work; ~5 min on 2 cores)
# Reuses WORKDIR/bundle-sam3_small from reproduce_cpu.sh, building it if missing (~5 min).
set -euo pipefail
WORK=${1:-/tmp/bench-work}
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results
NICE="nice -n 10"
BUNDLE=$WORK/bundle-sam3_small
REPOSITORY=$WORK/triton-sam3_small
mkdir -p "$WORK" "$OUT"

if [ ! -f "$BUNDLE/manifest.json" ]; then
  $NICE $PY -c "import sys; from tests.conftest import make_tiny_model; make_tiny_model(sys.argv[1]).save_pretrained(sys.argv[2])" \
    sam3_small "$WORK/ckpt-sam3_small"
  $NICE $PY -m export build --checkpoint "$WORK/ckpt-sam3_small" --out "$BUNDLE" --name sam3-small-random --verify-cases 1
fi
$PY -m export triton "$BUNDLE" "$REPOSITORY" --platform python --max-batch 8 --request-instances 1

port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
GRPC=$(port); HTTP=$(port); METRICS=$(port); LOCAL=$(port); REMOTE=$(port)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

$NICE $PY -m deploy.triton.local "$REPOSITORY" --grpc-port "$GRPC" --http-port "$HTTP" --metrics-port "$METRICS" \
  > "$WORK/tritonserver.log" 2>&1 &
PIDS+=($!)
SAM3_LOG_LEVEL=warning $NICE $PY -m server --bundle "$BUNDLE" --host 127.0.0.1 --port "$LOCAL" > "$WORK/server-local.log" 2>&1 &
PIDS+=($!)
SAM3_LOG_LEVEL=warning $NICE $PY -m server --bundle "$BUNDLE" --host 127.0.0.1 --port "$REMOTE" \
  --backend triton --triton-url "127.0.0.1:$GRPC" > "$WORK/server-triton.log" 2>&1 &
PIDS+=($!)
for url in "http://127.0.0.1:$LOCAL" "http://127.0.0.1:$REMOTE"; do
  for _ in $(seq 1 600); do curl -sf "$url/readyz" > /dev/null && break; sleep 1; done
  curl -sf "$url/readyz" > /dev/null || { echo "server $url not ready" >&2; exit 1; }
done

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for C in 1 8; do
  if [ "$C" = 1 ]; then N=24; else N=48; fi
  for TARGET in local triton; do
    if [ "$TARGET" = local ]; then URL="http://127.0.0.1:$LOCAL"; else URL="http://127.0.0.1:$REMOTE"; fi
    NAME=small-http-$TARGET-c$C
    $NICE $PY -m benchmarks http --url "$URL" --concurrency "$C" --requests "$N" --cold-fraction 0.25 \
      --json "$OUT/$NAME.json" --markdown "$OUT/$NAME.md" --plot "$OUT/$NAME.png"
  done
done
# Triton's own counters after the runs: executions vs inferences per model (batching).
curl -sf "http://127.0.0.1:$METRICS/metrics" | grep -E '^nv_inference_(count|exec_count)\{' > "$OUT/small-http-triton-metrics.txt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
$NICE $PY -m benchmarks.triton_transfer --shape small full --calls 10 --warmup 2 \
  --json "$OUT/triton-transfer.json" --markdown "$OUT/triton-transfer.md"
