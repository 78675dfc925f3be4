#!/usr/bin/env bash
# GPU checks and measurements on a bare GPU host with no internet access.
#
# The host needs Python with PyTorch (CUDA) and this checkout. Everything else comes
# as wheels in one folder (see "Wheels" in the README): Triton 2.51 (nvidia-pytriton),
# DALI 2.4 for CUDA 13 and its nvImageCodec/nvJPEG wheels, transformers 5.24 and the
# few small packages the python models import. Steps, in order:
#
#   tools/gpu_host.sh receive FILE...   copy wheel archive pieces (part-NN) into $WHEELS/parts
#   tools/gpu_host.sh install           join the pieces if any, pip install them (no index) into the
#                                       interpreter's own site-packages: the python backend stubs of
#                                       tritonserver import from there, ahead of PYTHONPATH
#   tools/gpu_host.sh install-vllm      vLLM 0.26.0 and its 91 wheels (docs/reference list) from the
#                                       pieces in $VLLM_WHEELS/parts, --no-deps, then numpy 1.26.4 + scipy
#                                       1.17.1 from $WHEELS again (the python backend stub needs numpy<2)
#   tools/gpu_host.sh checks            tiny bundles: pytest -m gpu (GPU vs CPU preprocessing, served
#                                       gpu-hf profile greedy tokens vs the cpu profile)
#   tools/gpu_host.sh preprocess        preprocessing samples/s: raw DALI GPU, served, CPU path
#   tools/gpu_host.sh decode            9B-shaped bundle (built on the GPU); decode step vs weight-read floor
#   tools/gpu_host.sh serve             9B-shaped model served: before (batch 1) / after (in-flight batching);
#                                       SERVE=before|after runs one side, BEFORE_CONCURRENCY / BEFORE_REQUESTS
#                                       size the slow side (one request at a time)
#   tools/gpu_host.sh pack DEST         tar the results folder into DEST/results.tar.gz
#   tools/gpu_host.sh all               install, checks, preprocess, decode, serve
#
# Results go to $RESULTS (default /tmp/mm-work/results). Each step logs to $RESULTS/<step>.log.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${WHEELS:-/tmp/mm-wheels}
VLLM_WHEELS=${VLLM_WHEELS:-/tmp/vllm-wheels}
WORK=${WORK:-/tmp/mm-work}
RESULTS=${RESULTS:-$WORK/results}
PY=${PYTHON:-python3}
CONCURRENCY=${CONCURRENCY:-16,32}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$WHEELS/parts" "$WORK" "$RESULTS"

log() { echo "[gpu_host $(date +%H:%M:%S)] $*" >&2; }

step_receive() {
  for f in "$@"; do cp "$f" "$WHEELS/parts/"; log "received $(basename "$f") ($(du -h "$f" | cut -f1))"; done
}

step_install() {
  if compgen -G "$WHEELS/parts/part-*" >/dev/null; then
    cat "$WHEELS"/parts/part-* | tar -x -C "$WHEELS"
    log "joined $(ls "$WHEELS"/parts | wc -l) pieces"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "$WHEELS"/*.whl
  "$PY" - <<'EOF'
import torch, transformers, nvidia.dali, tritonclient
from mmtriton.serving.server import tritonserver_binary
print(tritonserver_binary())
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpu {torch.cuda.get_device_name(0)}")
print(f"transformers {transformers.__version__} dali {nvidia.dali.__version__}")
EOF
}

step_install_vllm() {
  mkdir -p "$VLLM_WHEELS/parts"
  if compgen -G "$VLLM_WHEELS/parts/part-*" >/dev/null; then
    cat "$VLLM_WHEELS"/parts/part-* | tar -x -C "$VLLM_WHEELS"
    log "joined $(ls "$VLLM_WHEELS"/parts | wc -l) vLLM pieces"
  fi
  # --no-deps: pip's resolver trips on vLLM's numba / mistral-common pins; the set is complete.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$VLLM_WHEELS"/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --force-reinstall \
    "$WHEELS"/numpy-1.26.4-*.whl "$WHEELS"/scipy-1.17.1-*.whl
  "$PY" -c "import vllm, numpy, scipy, torch; print('vllm', vllm.__version__, 'numpy', numpy.__version__, \
'scipy', scipy.__version__, 'torch', torch.__version__)"
}

tiny_bundle() {
  "$PY" -m build_engines bundle --spec "$ROOT/build_engines/specs/tiny.toml" --out "$WORK/bundles/tiny-mm"
}

step_checks() {
  tiny_bundle
  (cd "$ROOT" && MMTRITON_BUILD="$WORK" "$PY" -m pytest tests -m gpu -v -s -p no:cacheprovider \
    --junitxml="$RESULTS/gpu-checks.xml") 2>&1 | tee "$RESULTS/checks.log"
}

step_preprocess() {
  tiny_bundle
  # The 9B spec's image size (224) and batches up to 128; only the two preprocessing models load.
  local set=(--set vision.image_size=224 --set serving.max_batch_size=128 --set serving.preprocess_instances=2)
  "$PY" -m build_engines render --bundle "$WORK/bundles/tiny-mm" --profile gpu-hf --out "$WORK/repo-pre-gpu-hf" "${set[@]}"
  "$PY" -m build_engines render --bundle "$WORK/bundles/tiny-mm" --profile cpu --out "$WORK/repo-pre-cpu" "${set[@]}"
  "$PY" - "$WORK" "$RESULTS" <<'EOF' 2>&1 | tee "$RESULTS/preprocess.log"
import sys
from pathlib import Path
from bench.preprocess import main
from mmtriton.serving.server import TritonServer

work, results = Path(sys.argv[1]), Path(sys.argv[2])
root = Path.cwd()
server = TritonServer(
    model_repository=work / "repo-pre-gpu-hf",
    work_dir=work / "server-pre",
    extra_args=["--model-control-mode=explicit", "--load-model=image_preprocess", "--load-model=audio_preprocess"],
    pythonpath=[root],
)
with server:
    main(["--gpu-hf-repo", str(work / "repo-pre-gpu-hf"), "--cpu-repo", str(work / "repo-pre-cpu"),
          "--url", server.grpc_url, "--batch", "64,128", "--out", str(results / "preprocess")])
EOF
}

big_bundle() {
  if [ ! -f "$WORK/bundles/glm4-9b-shape/bundle.json" ]; then
    "$PY" -m build_engines bundle --spec "$ROOT/build_engines/specs/glm4-9b-shape.toml" \
      --out "$WORK/bundles/glm4-9b-shape" --device cuda
  fi
}

step_decode() {
  big_bundle 2>&1 | tee "$RESULTS/bundle-9b.log"
  "$PY" -m bench.decode --llm "$WORK/bundles/glm4-9b-shape/llm" --out "$RESULTS/decode" 2>&1 \
    | tee "$RESULTS/decode.log"
}

step_serve() {
  big_bundle
  "$PY" -m build_engines render --bundle "$WORK/bundles/glm4-9b-shape" --profile gpu-hf --out "$WORK/repo-9b-after"
  "$PY" -m build_engines render --bundle "$WORK/bundles/glm4-9b-shape" --profile gpu-hf --out "$WORK/repo-9b-before" \
    --set serving.max_batch_size=1
  local bw=()
  if [ -f "$RESULTS/decode/decode.json" ]; then
    bw=(--copy-bandwidth-gbs "$("$PY" -c "import json; print(json.load(open('$RESULTS/decode/decode.json'))['copy_bandwidth_TBps'] * 1000)")")
  fi
  # Before (engine batch 1) runs fewer requests: at ~20 s per 256-token answer one at a time,
  # 8 requests already take minutes. After (in-flight batching) runs the full sweep.
  local common=(--input-tokens 512 --input-spread 32 --output-tokens 256 --image-share 0.25 --audio-share 0.25
    --warmup 1 --timeout 900 "${bw[@]}")
  if [ "${SERVE:-both}" != after ]; then
    local bc=${BEFORE_CONCURRENCY:-16}
    "$PY" -m bench --start-cpu-server --repo "$WORK/repo-9b-before" --concurrency "$bc" \
      --requests "${BEFORE_REQUESTS:-8}" --results-dir "$RESULTS/serve-before-c$bc" "${common[@]}" 2>&1 \
      | tee "$RESULTS/serve-before-c$bc.log"
  fi
  if [ "${SERVE:-both}" != before ]; then
    "$PY" -m bench --start-cpu-server --repo "$WORK/repo-9b-after" --concurrency "$CONCURRENCY" \
      --requests "${REQUESTS:-64}" --results-dir "$RESULTS/serve-after" "${common[@]}" 2>&1 | tee "$RESULTS/serve-after.log"
  fi
}

step_pack() {
  local dest=${1:?pack needs a destination folder}
  mkdir -p "$dest"
  tar -czf "$dest/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  log "wrote $dest/results.tar.gz"
}

cd "$ROOT"
step=${1:?usage: tools/gpu_host.sh receive|install|install-vllm|checks|preprocess|decode|serve|pack|all}
shift
case "$step" in
  receive) step_receive "$@" ;;
  install) step_install ;;
  install-vllm) step_install_vllm ;;
  checks) step_checks ;;
  preprocess) step_preprocess ;;
  decode) step_decode ;;
  serve) step_serve ;;
  pack) step_pack "$@" ;;
  all) step_install; step_checks; step_preprocess; step_decode; step_serve ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
