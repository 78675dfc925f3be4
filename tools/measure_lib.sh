# Shared by tools/vllm_measure.sh and tools/tp_measure.sh (sourced, not run): the workload both
# measure and the tritonserver each of their steps starts and stops.
# Needs ROOT (the checkout) and OUT (results folder, created here) set, and TOOL (the log prefix).

WORK=${WORK:-/tmp/mm-work}
PY=${PYTHON:-python3}
BUNDLE=$WORK/bundles/glm4-9b-shape
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[$TOOL $(date +%H:%M:%S)] $*" >&2; }

# 512 +-32 prompt tokens, 256 output tokens (ignore_eos), a quarter with an image, a quarter with a
# 10 s clip; 16 requests at c=1, REQUESTS (128) at the other levels.
WORKLOAD=(--input-tokens 512 --input-spread 32 --output-tokens 256 --image-share 0.25 --audio-share 0.25
  --audio-seconds 10)
C1_REQUESTS=${C1_REQUESTS:-16}
REQUESTS=${REQUESTS:-128}

ensure_bundle() {  # the 9B-shaped random-weight bundle, built on the GPU unless present
  [ -f "$BUNDLE/bundle.json" ] || "$PY" -m build_engines bundle --spec "$ROOT/build_engines/specs/glm4-9b-shape.toml" \
    --out "$BUNDLE" --device cuda
}

SERVER=
serve_start() {  # serve_start NAME: python -m mmtriton.server on $WORK/repo-NAME, ports 18000-18002
  log "starting tritonserver on repo-$1 (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-all})"
  "$PY" -m mmtriton.server --model-repository "$WORK/repo-$1" --work-dir "$WORK/server-$1" \
    --http-port 18000 --grpc-port 18001 --metrics-port 18002 > "$OUT/server-$1.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 900); do
    curl -sf localhost:18000/v2/health/ready >/dev/null 2>&1 && { log "ready"; return 0; }
    kill -0 "$SERVER" 2>/dev/null || { tail -40 "$OUT/server-$1.log"; exit 1; }
    sleep 1
  done
  log "server not ready in 900 s"; exit 1
}

serve_stop() {  # stops the server serve_start started, by its own pid
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=
}
