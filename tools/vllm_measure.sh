#!/usr/bin/env bash
# Served gpu-vllm vs vLLM's own AsyncLLM in-process, 9B-shaped random weights, one GPU.
# Run on a GPU host after tools/gpu_host.sh install and the vLLM wheels (see the README).
# Same workload both sides: text-only token-id prompts, 512 +-32 in, 256 out (ignore_eos).
#   tools/vllm_measure.sh OUT_DIR [CONCURRENCY]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?output folder}
CONC=${2:-16,32}
WORK=${WORK:-/tmp/mm-work}
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[vllm_measure $(date +%H:%M:%S)] $*" >&2; }
if [ ! -f "$WORK/bundles/glm4-9b-shape/bundle.json" ]; then
  log "building the 9B-shaped bundle on the GPU"
  "$PY" -m build_engines bundle --spec "$ROOT/build_engines/specs/glm4-9b-shape.toml" --out "$WORK/bundles/glm4-9b-shape" --device cuda
fi
log "in-process AsyncLLM"
"$PY" -m bench.vllm_inprocess --model "$WORK/bundles/glm4-9b-shape/llm" --max-num-seqs 64 --max-model-len 2560 \
  --concurrency "$CONC" --requests 64 --out "$OUT/inprocess.json" 2>&1 | grep -v "^INFO\|^WARNING\|^(EngineCore" | tail -20
log "served gpu-vllm"
"$PY" -m build_engines render --bundle "$WORK/bundles/glm4-9b-shape" --profile gpu-vllm --out "$WORK/repo-9b-vllm"
"$PY" -m mmtriton.server --model-repository "$WORK/repo-9b-vllm" --work-dir "$WORK/server-vllm" \
  --http-port 18000 --grpc-port 18001 --metrics-port 18002 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf localhost:18000/v2/health/ready >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$OUT/server.log"; exit 1; }
  sleep 1
done
"$PY" -m bench --url localhost:18001 --metrics-url http://localhost:18002/metrics --concurrency "$CONC" --requests 64 \
  --input-tokens 512 --input-spread 32 --output-tokens 256 --image-share 0 --audio-share 0 --warmup 4 \
  --results-dir "$OUT/served" 2>&1 | tail -25
