#!/usr/bin/env bash
# Served gpu-vllm against vLLM's own AsyncLLM in-process on one GPU, in one run (issue 13's measurement).
# Run on a GPU host after `tools/gpu_host.sh install` and the vLLM wheels (docs/gpu-hosts.md).
#
#   tools/vllm_measure.sh OUT_DIR [STEP...]
#
# Steps (default: all, in this order; each leaves its files in OUT_DIR):
#   bundle     the 9B-shaped random-weight bundle, built on the GPU (skipped when present)
#   bandwidth  copy bandwidth (read + write) of each GPU and the weight-read floor (GPU 0) -> bandwidth.json
#   inprocess  the anchor: bench.vllm_inprocess on the served repository's settings -> inprocess.json
#   served     the product: tritonserver on the gpu-vllm repository, bench c=1 and c=16,32,64 -> served-*/
#   unpaced    the same server with other stream_chunk_rate values (PACE_RATES, default "0": every engine
#              step streamed), c=16,32,64 -> unpaced-rate<R>/
#   before     the same engine with one sequence at a time (max_batch_size 1), c=16 -> before/
#   hf         today's transformers engine (gpu-hf profile), c=32 -> hf/
#   report     bench.vllm_report: vllm-report.{json,md} and the plot
#
# Workload everywhere: 512 +-32 prompt tokens, 256 output tokens (ignore_eos), greedy, a quarter of
# the requests with an image, a quarter with a 10 s clip; TP=1 (the spec's TP is overridden).
# Each tritonserver is started by this script (python -m mmtriton.server, ports 18000-18002) and
# stopped by its own pid before the next one starts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?output folder}
shift
STEPS=${*:-bundle bandwidth inprocess served unpaced before hf report}
TOOL=vllm_measure
# shellcheck source=tools/measure_lib.sh
. "$ROOT/tools/measure_lib.sh"  # WORK, PY, BUNDLE, log, WORKLOAD, C1_REQUESTS, REQUESTS, ensure_bundle, measure_bandwidth, bandwidth_gbs, serve_start, serve_stop

render() {  # render NAME PROFILE [--set k=v ...]
  local name=$1 profile=$2
  shift 2
  "$PY" -m build_engines render --bundle "$BUNDLE" --profile "$profile" --out "$WORK/repo-$name" \
    --set serving.tensor_parallel_size=1 "$@" >/dev/null
}

trap serve_stop EXIT

bench() {  # bench RESULTS_DIR CONCURRENCY REQUESTS
  "$PY" -m bench --url localhost:18001 --metrics-url http://localhost:18002/metrics --concurrency "$2" \
    --requests "$3" "${WORKLOAD[@]}" --warmup 4 --timeout 900 --copy-bandwidth-gbs "$(bandwidth_gbs)" \
    --results-dir "$OUT/$1" 2>&1 | grep -E "^\[|tok/s|Error|error" | tail -8
}

for step in $STEPS; do
  log "step $step"
  case $step in
    bundle) ensure_bundle ;;
    bandwidth) measure_bandwidth ;;
    inprocess)
      render vllm gpu-vllm
      "$PY" -m bench.vllm_inprocess --repo "$WORK/repo-vllm" --concurrency 1,16,32,64 \
        --requests "$C1_REQUESTS,$REQUESTS,$REQUESTS,$REQUESTS" "${WORKLOAD[@]}" --out "$OUT/inprocess.json" 2>&1 \
        | grep -E "^in-process|Error" ;;
    served)
      render vllm gpu-vllm
      serve_start vllm
      bench served-c1 1 "$C1_REQUESTS"
      bench served 16,32,64 "$REQUESTS"
      serve_stop ;;
    unpaced)
      for rate in ${PACE_RATES:-0}; do
        render "vllm-rate$rate" gpu-vllm --set "serving.stream_chunk_rate=$rate"
        serve_start "vllm-rate$rate"
        bench "unpaced-rate$rate" "${UNPACED_C:-16,32,64}" "$REQUESTS"
        serve_stop
      done ;;
    before)
      render vllm-bs1 gpu-vllm --set serving.max_batch_size=1
      serve_start vllm-bs1
      bench before 16 32
      serve_stop ;;
    hf)
      render hf gpu-hf
      serve_start hf
      bench hf 32 32
      serve_stop ;;
    report)
      "$PY" -m bench.vllm_report "$OUT" --floor-ms "$("$PY" -c "import json; print(json.load(open('$OUT/bandwidth.json'))['weight_read_floor_ms'])")" ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
done
