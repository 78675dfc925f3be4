#!/usr/bin/env bash
# Tensor parallelism on the served gpu-vllm repository: TP=1 on one GPU against TP=2 on two, each beside
# vLLM's own AsyncLLM in-process with the same settings (issue 16). Same workload as tools/vllm_measure.sh.
# Run on a GPU host after `tools/gpu_host.sh install` and `install-vllm` (docs/gpu-hosts.md,
# docs/tensor-parallel.md).
#
#   tools/tp_measure.sh OUT_DIR [STEP...]
#
# Steps (default: all, in this order; each leaves its files in OUT_DIR):
#   bundle         the 9B-shaped random-weight bundle, built on the GPU (skipped when present)
#   bandwidth      copy bandwidth (read + write) of every visible GPU, weight bytes -> bandwidth.json
#   inprocess-tp1  bench.vllm_inprocess on the repository rendered with tensor_parallel_size 1 -> inprocess-tp1.json
#   inprocess-tp2  the same with tensor_parallel_size 2 on two GPUs -> inprocess-tp2.json
#   served-tp1     tritonserver on the TP=1 repository, bench c=1 and c=16,32,64 -> served-tp1-c1/, served-tp1/
#   served-tp2     the same on the TP=2 repository -> served-tp2-c1/, served-tp2/
#   report         bench.tp_report: tp-report.{json,md} and tp-report.png
# (`inprocess` and `served` run both sizes.) A TP=N step with fewer than N GPUs visible is skipped: it
# says so on stderr and in OUT_DIR/skipped-<step>.txt, which the report shows as "not run".
#
# Workload everywhere: 512 +-32 prompt tokens, 256 output tokens (ignore_eos), greedy, a quarter of the
# requests with an image, a quarter with a 10 s clip; C1_REQUESTS at c=1, REQUESTS at c=16/32/64.
# A TP=N step sees the first N GPUs of CUDA_VISIBLE_DEVICES (all GPUs when unset), so TP=1 is the
# one-GPU measurement again. Preprocessing (DALI) and the encoders run on GPU 0 (the gpu-vllm render
# pins their instances there); where every model runs goes to placement-tp<N>.json. The served benchmark runs
# through `python -m bench`, which samples NVML utilization and memory per GPU (Triton's
# nv_gpu_utilization / nv_gpu_memory_used_bytes, one series per gpu_uuid).
#
# NVLink multicast stays off in every process: the three variables below are exported before anything
# starts; tritonserver gets this environment (mmtriton.serving.server.server_env copies it), its python backend
# stubs inherit it from tritonserver, and vLLM's worker processes inherit it from the stub.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?output folder}
shift
STEPS=${*:-bundle bandwidth inprocess-tp1 inprocess-tp2 served-tp1 served-tp2 report}
TOOL=tp_measure
# shellcheck source=tools/measure_lib.sh
. "$ROOT/tools/measure_lib.sh"  # WORK, PY, BUNDLE, log, WORKLOAD, C1_REQUESTS, REQUESTS, ensure_bundle, measure_bandwidth, bandwidth_gbs, serve_start, serve_stop
# The GPUs this host lets the script use, in order (CUDA_VISIBLE_DEVICES as given, else every GPU).
HOST_GPUS=${CUDA_VISIBLE_DEVICES-}

gpu_count() {  # GPUs CUDA shows this process (0 when torch or the driver is missing)
  local n
  n=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null | tail -1) || n=0
  [[ $n =~ ^[0-9]+$ ]] || n=0
  echo "$n"
}

gpus_for() {  # gpus_for N: the first N GPUs of the host's list, comma-separated
  if [ -n "$HOST_GPUS" ]; then
    echo "$HOST_GPUS" | tr ',' '\n' | head -n "$1" | paste -sd, -
  else
    seq -s, 0 $(($1 - 1))
  fi
}

enough_gpus() {  # enough_gpus N STEP: 0 when N GPUs are visible, else log, write skipped-STEP.txt, return 1
  local have
  have=$(gpu_count)
  if [ "$have" -ge "$1" ]; then
    rm -f "$OUT/skipped-$2.txt"
    return 0
  fi
  local why="$2 skipped: tensor_parallel_size $1 needs $1 GPUs, $have visible"
  log "$why"
  echo "$why" > "$OUT/skipped-$2.txt"
  return 1
}

render() {  # render TP: the gpu-vllm repository with tensor_parallel_size TP (encoders on GPU 0)
  "$PY" -m build_engines render --bundle "$BUNDLE" --profile gpu-vllm --out "$WORK/repo-vllm-tp$1" \
    --set "serving.tensor_parallel_size=$1" >/dev/null
  "$PY" -m bench.tp_report placement "$WORK/repo-vllm-tp$1" --out "$OUT/placement-tp$1.json" >&2
}

trap serve_stop EXIT

bench() {  # bench RESULTS_DIR CONCURRENCY REQUESTS
  "$PY" -m bench --url localhost:18001 --metrics-url http://localhost:18002/metrics \
    --server-pid "$SERVER" --concurrency "$2" --requests "$3" "${WORKLOAD[@]}" --warmup 4 --timeout 900 \
    --copy-bandwidth-gbs "$(bandwidth_gbs)" --results-dir "$OUT/$1" 2>&1 | grep -E "^\[|tok/s|Error|error" | tail -8
}

inprocess() {  # inprocess TP
  enough_gpus "$1" "inprocess-tp$1" || return 0
  render "$1"
  CUDA_VISIBLE_DEVICES=$(gpus_for "$1") "$PY" -m bench.vllm_inprocess --repo "$WORK/repo-vllm-tp$1" \
    --concurrency 1,16,32,64 --requests "$C1_REQUESTS,$REQUESTS,$REQUESTS,$REQUESTS" "${WORKLOAD[@]}" \
    --out "$OUT/inprocess-tp$1.json" 2>&1 | grep -E "^in-process|Error"
}

served() {  # served TP
  enough_gpus "$1" "served-tp$1" || return 0
  render "$1"
  export CUDA_VISIBLE_DEVICES
  CUDA_VISIBLE_DEVICES=$(gpus_for "$1")
  serve_start "vllm-tp$1"
  bench "served-tp$1-c1" 1 "$C1_REQUESTS"
  bench "served-tp$1" 16,32,64 "$REQUESTS"
  serve_stop
  if [ -n "$HOST_GPUS" ]; then CUDA_VISIBLE_DEVICES=$HOST_GPUS; else unset CUDA_VISIBLE_DEVICES; fi
}

for step in $STEPS; do
  log "step $step"
  case $step in
    bundle) ensure_bundle ;;
    bandwidth) measure_bandwidth ;;
    inprocess) inprocess 1; inprocess 2 ;;
    inprocess-tp1) inprocess 1 ;;
    inprocess-tp2) inprocess 2 ;;
    served) served 1; served 2 ;;
    served-tp1) served 1 ;;
    served-tp2) served 2 ;;
    report)
      "$PY" -m bench.tp_report report "$OUT" ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
done
