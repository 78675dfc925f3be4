# gpu profile image: Triton + TensorRT-LLM 1.2.1 (C++ tensorrtllm backend, python backend),
# plus the DALI backend of the same Triton release, plus this project's python packages.
# The versions are pinned in build_engines/stack.toml; tests/test_gpu_profile.py checks that
# the two ARG defaults below equal it.
#
#   docker compose build triton            (or: docker build -t mmtriton-gpu .)

# The -trtllm-python-py3 image ships only the tensorrtllm and python backends (and ensembles).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3
# The full image of the same release carries the DALI backend; only that folder is taken.
ARG DALI_SOURCE_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3

FROM ${DALI_SOURCE_IMAGE} AS dali_source

FROM ${TRITON_IMAGE}

COPY --from=dali_source /opt/tritonserver/backends/dali /opt/tritonserver/backends/dali
# The DALI backend keeps its Python wheel (and that wheel's dependencies) in wheel/dali;
# autoserialization of 1/dali.py runs `python3 -c ...` and needs nvidia.dali importable.
# Same line as Triton's build.py (r26.07) writes for images with the DALI backend.
ENV PYTHONPATH=/opt/tritonserver/backends/dali/wheel/dali:$PYTHONPATH

# What the project's python models and build_engines need beyond the image: the image
# already has numpy<2, transformers, tokenizers, safetensors, pillow, soundfile, onnx and
# torch through TensorRT-LLM's own requirements. build_engines renders configs with
# Triton's model_config_pb2 (tritonclient); the clients use its gRPC client.
# Not installed on purpose: torch/transformers upgrades (TensorRT-LLM pins its own), and
# onnxruntime (the gpu profile runs the encoders on TensorRT).
RUN python3 -m pip install --no-cache-dir "tritonclient[grpc]==2.73.0" "soundfile==0.14.0"

WORKDIR /workspace
COPY mmtriton/ mmtriton/
COPY build_engines/ build_engines/
COPY clients/ clients/
# Templates: build_engines renders the gpu-profile repository inside the image.
COPY model_repository/ model_repository/
ENV PYTHONPATH=/workspace:$PYTHONPATH

# Fail the image build, not the first request, if an import the models need is missing.
RUN python3 -c "import numpy, transformers, PIL, soundfile, nvidia.dali, tritonclient.grpc.model_config_pb2; \
print('numpy', numpy.__version__, numpy.__file__); print('transformers', transformers.__version__); \
print('dali', nvidia.dali.__version__)" \
 && test -f /opt/tritonserver/backends/dali/libtriton_dali.so \
 && command -v mpirun && command -v trtllm-build

CMD ["python3", "-m", "mmtriton.tp_launcher", "--model-repository", "/workspace/build/repo-gpu-tiny-gpu", "--gpus", "0,1"]
