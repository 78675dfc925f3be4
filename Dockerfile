# gpu-trtllm profile image: Triton + TensorRT-LLM 1.2.1 (C++ tensorrtllm backend, python backend),
# plus the DALI and TensorRT backends of the same Triton release, plus this project's python
# packages.
# The versions are pinned in build_engines/stack.toml; tests/test_gpu_trtllm_profile.py checks that
# the two ARG defaults below equal it.
#
#   docker compose build triton            (or: docker build -t mmtriton-gpu .)

# The -trtllm-python-py3 image ships only the tensorrtllm and python backends (and ensembles).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3
# The full image of the same release carries the DALI and TensorRT backends; only those folders
# are taken (build_engines/image_backends.py lists what the image then has; tests check that
# every backend the gpu repository names is among them).
ARG DALI_SOURCE_IMAGE=nvcr.io/nvidia/tritonserver:26.07-py3

FROM ${DALI_SOURCE_IMAGE} AS dali_source

FROM ${TRITON_IMAGE}

COPY --from=dali_source /opt/tritonserver/backends/dali /opt/tritonserver/backends/dali
# vision_encoder (gpu-trtllm profile) is a TensorRT plan served by the TensorRT backend. The backend
# library resolves libnvinfer.so.10 through LD_LIBRARY_PATH to this image's TensorRT 10.14
# (/usr/local/tensorrt/lib), the same TensorRT trtexec builds the plan with; checked below.
COPY --from=dali_source /opt/tritonserver/backends/tensorrt /opt/tritonserver/backends/tensorrt
# The DALI backend keeps its Python wheel (and that wheel's dependencies) in wheel/dali;
# autoserialization of 1/dali.py runs `python3 -c ...` and needs nvidia.dali importable.
# Triton's build.py puts that folder on PYTHONPATH, i.e. ahead of site-packages, where the
# copies of numpy & co. bundled with DALI would shadow TensorRT-LLM's pinned ones (numpy<2).
# A .pth file in python3's site-packages appends it after site-packages instead.
RUN echo /opt/tritonserver/backends/dali/wheel/dali \
      > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/triton-dali-backend.pth"

# What the project's python models and build_engines need beyond the image: the image
# already has numpy<2, transformers, tokenizers, safetensors, pillow, soundfile, onnx and
# torch through TensorRT-LLM's own requirements. build_engines renders configs with
# Triton's model_config_pb2 (tritonclient); the clients use its gRPC client.
# Not installed on purpose: torch/transformers upgrades (TensorRT-LLM pins its own), and
# onnxruntime (the gpu-trtllm profile runs the vision encoder on TensorRT, the audio encoder on PyTorch).
# tritonclient matches the server of the release (26.07 = Triton 2.71.0, server TRITON_VERSION on
# branch r26.07); "numpy<2" keeps pip from replacing TensorRT-LLM's numpy.
RUN python3 -m pip install --no-cache-dir "tritonclient[grpc]==2.71.0" "soundfile==0.14.0" "numpy<2"

WORKDIR /workspace
COPY mmtriton/ mmtriton/
COPY build_engines/ build_engines/
COPY clients/ clients/
# Templates: build_engines renders the gpu-trtllm repository inside the image.
COPY model_repository/ model_repository/
# No trailing ':' when PYTHONPATH is empty (an empty entry would put the cwd on sys.path).
ENV PYTHONPATH=/workspace${PYTHONPATH:+:${PYTHONPATH}}

# Fail the image build, not the first request, if an import the models need is missing, if
# numpy is not TensorRT-LLM's (<2, not DALI's copy), or if the TensorRT backend cannot find a
# library or would load another TensorRT than /usr/local/tensorrt's.
RUN python3 -c "import numpy, transformers, PIL, soundfile, nvidia.dali, tritonclient.grpc.model_config_pb2; \
print('numpy', numpy.__version__, numpy.__file__); print('transformers', transformers.__version__); \
print('dali', nvidia.dali.__version__); \
assert int(numpy.__version__.split('.')[0]) < 2 and '/backends/dali/' not in numpy.__file__, numpy.__file__" \
 && test -f /opt/tritonserver/backends/dali/libtriton_dali.so \
 && test -f /opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so \
 && ! ldd /opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so | grep "not found" \
 && ldd /opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so | grep "libnvinfer.so.10 => /usr/local/tensorrt" \
 && command -v mpirun && command -v trtllm-build \
 && { test -x /usr/local/tensorrt/bin/trtexec || command -v trtexec; }

CMD ["python3", "-m", "mmtriton.tp_launcher", "--model-repository", "/workspace/build/repo-gpu-trtllm-tiny-gpu", "--gpus", "0,1"]
