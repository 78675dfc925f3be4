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

measure_bandwidth() {  # $OUT/bandwidth.json: each GPU's copy bandwidth, weight bytes, GPU 0's weight-read floor
  "$PY" - "$BUNDLE/llm" "$OUT/bandwidth.json" <<'EOF'
import json, sys
import torch
from bench.decode import copy_bandwidth
from bench.utilization import weight_bytes
weights = weight_bytes(sys.argv[1])
gpus = []
for index in range(torch.cuda.device_count()):
    with torch.cuda.device(index):
        bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(index)
    gpus.append({"index": index, "name": props.name, "uuid": f"GPU-{props.uuid}", "copy_bandwidth_gbs": bw / 1e9})
out = {"gpu": gpus[0]["name"], "copy_bandwidth_gbs": gpus[0]["copy_bandwidth_gbs"], "weight_bytes": weights,
       "weight_read_floor_ms": weights / (gpus[0]["copy_bandwidth_gbs"] * 1e9) * 1e3, "gpus": gpus}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(out)
EOF
}

bandwidth_gbs() {  # GPU 0's copy bandwidth from bandwidth.json (bench's --copy-bandwidth-gbs, its MBU column)
  "$PY" -c "import json; print(json.load(open('$OUT/bandwidth.json'))['copy_bandwidth_gbs'])"
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
