"""The TensorRT-LLM engine settings of one model spec, before any command is planned.

:func:`llm_settings` derives every setting of the checkpoint conversion and the engine
build (parallel sizes, lengths, tokens per step, prompt-table size) from the spec and
refuses what TensorRT-LLM 1.2.1 cannot build. The commands that use them are in
:mod:`build_engines.trtllm_commands`, the whole plan in :mod:`build_engines.trtllm_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmtriton.spec import ModelSpec, prompt_table_rows_per_request

#: ``convert_checkpoint.py --dtype`` choices this plan passes (``auto`` is never used).
CONVERT_DTYPES = ("float16", "bfloat16", "float32")
DTYPE_TAGS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: Dtype of every engine this plan builds: that of the prompt table the encoders send
#: (``prompt_embedding_table`` TYPE_FP16 in model_repository/tensorrt_llm/config.pbtxt). The
#: batch manager refuses a request table whose dtype differs from the engine's
#: (build_engines/trtllm_facts.py ``ENGINE_DTYPE_TO_TRITON``); upstream's multimodal examples
#: convert with ``--dtype float16`` too. The spec's ``llm.dtype`` is the checkpoint's dtype.
ENGINE_DTYPE = "float16"
#: Upper bound for ``--max_num_tokens``: TensorRT-LLM's own default chunk size
#: (tensorrtllm_backend docs/multimodal.md, 1.2.1-era).
DEFAULT_MAX_NUM_TOKENS = 8192
#: Tensor-parallel size of the gpu-trtllm profile, the one default of the plan and of
#: ``python -m build_engines.trtllm_build --tp-size``: docker-compose.yml's ``triton`` service
#: (and the Dockerfile's CMD) run the TP launcher on 2 GPUs. It is not the spec's
#: ``serving.tensor_parallel_size``, which is the vLLM engine's (1 for tiny-gpu.toml). What a
#: build used is recorded in its ``gpu_build.json``, and the renderer reads it from there
#: (:func:`build_engines.trtllm_plan.plan_for_engines`).
TP_SIZE = 2


class GpuBuildError(RuntimeError):
    """The plan cannot be made, the machine cannot run it, or a step failed."""


@dataclass(frozen=True)
class LLMFamily:
    """How TensorRT-LLM 1.2.1 converts one model family's Hugging Face checkpoint.

    Attributes:
        name: ``llm.family`` in the model spec.
        convert_script: ``convert_checkpoint.py`` path relative to the examples folder.
        convert_args: Family-specific flags added to the common ones.
    """

    name: str
    convert_script: str
    convert_args: tuple[str, ...] = ()


FAMILIES: dict[str, LLMFamily] = {
    "llama": LLMFamily("llama", "models/core/llama/convert_checkpoint.py"),
    # ChatGLMForCausalLM; the script infers the version when omitted, naming it is explicit.
    "glm": LLMFamily("glm", "models/core/glm-4-9b/convert_checkpoint.py", ("--chatglm_version", "glm4")),
}


@dataclass(frozen=True)
class LLMBuildSettings:
    """Every setting of the TensorRT-LLM checkpoint conversion and engine build."""

    family: LLMFamily
    tp_size: int
    pp_size: int
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_prompt_embedding_table_size: int
    checkpoint_dtype: str = ENGINE_DTYPE

    @property
    def world_size(self) -> int:
        """GPUs (MPI ranks) the engine needs: ``tp_size x pp_size``."""
        return self.tp_size * self.pp_size

    @property
    def parallel_tag(self) -> str:
        """``tp2`` or ``tp2-pp2``, for folder names."""
        return f"tp{self.tp_size}" + (f"-pp{self.pp_size}" if self.pp_size > 1 else "")

    def engine_name(self, spec_name: str) -> str:
        """Engine folder name, e.g. ``tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520``."""
        return (
            f"{spec_name}-{self.parallel_tag}-{DTYPE_TAGS[self.dtype]}-bs{self.max_batch_size}"
            f"-in{self.max_input_len}-seq{self.max_seq_len}-ptable{self.max_prompt_embedding_table_size}"
        )

    def checkpoint_name(self, spec_name: str) -> str:
        """TensorRT-LLM checkpoint folder name, e.g. ``tiny-gpu-ckpt-tp2-fp16``."""
        return f"{spec_name}-ckpt-{self.parallel_tag}-{DTYPE_TAGS[self.dtype]}"


def llm_settings(
    spec: ModelSpec, *, tp_size: int = TP_SIZE, pp_size: int = 1, max_num_tokens: int | None = None
) -> LLMBuildSettings:
    """Derive the engine settings from the spec.

    ``max_prompt_embedding_table_size`` is ``max_batch_size`` times the rows of
    one image and the longest audio clip, so every running request can carry a
    full table (the preprocessing model gives each request ``table // max_batch_size``
    rows, tensorrtllm_backend ``preprocessing/1/model.py``). ``max_num_tokens``
    (tokens per engine step) is ``max_batch_size x max_input_len`` capped at
    TensorRT-LLM's default of 8192, and never below ``max_input_len`` when
    chunked context is off (a whole prompt must then fit one step). The engine
    dtype is always :data:`ENGINE_DTYPE` (the prompt table's); ``llm.dtype`` is the
    checkpoint's, which ``convert_checkpoint.py --dtype`` casts from.

    Args:
        spec: The model spec.
        tp_size: Tensor-parallel size (:data:`TP_SIZE` for the gpu-trtllm profile).
        pp_size: Pipeline-parallel size.
        max_num_tokens: Tokens per engine step; derived as above when None.

    Returns:
        The settings.

    Raises:
        GpuBuildError: Unknown family or dtype, a non-positive parallel size, or
            lengths the model cannot hold.
    """
    family = FAMILIES.get(spec.llm.family)
    if family is None:
        raise GpuBuildError(f"llm.family {spec.llm.family!r} has no GPU build recipe; known: {sorted(FAMILIES)}")
    if spec.llm.dtype not in CONVERT_DTYPES:
        raise GpuBuildError(f"llm.dtype {spec.llm.dtype!r} is not one of {list(CONVERT_DTYPES)}")
    if tp_size < 1 or pp_size < 1:
        raise GpuBuildError(f"tp_size and pp_size must be at least 1, got {tp_size} and {pp_size}")
    llm = spec.llm
    if llm.num_attention_heads % tp_size:
        raise GpuBuildError(
            f"llm.num_attention_heads = {llm.num_attention_heads} does not split over tp_size {tp_size}"
        )
    # Fewer KV heads than ranks is allowed when each KV head is replicated a whole number of times.
    kv = llm.num_key_value_heads
    if kv % tp_size and tp_size % kv:
        raise GpuBuildError(f"llm.num_key_value_heads = {kv} neither splits over nor divides tp_size {tp_size}")
    max_seq_len = llm.max_input_len + llm.max_output_len
    if max_seq_len > llm.max_position_embeddings:
        raise GpuBuildError(
            f"max_input_len + max_output_len = {max_seq_len} exceeds llm.max_position_embeddings "
            f"{llm.max_position_embeddings}"
        )
    batch = spec.serving.max_batch_size
    if max_num_tokens is None:
        max_num_tokens = min(DEFAULT_MAX_NUM_TOKENS, batch * llm.max_input_len)
        if not spec.serving.enable_chunked_context:
            max_num_tokens = max(max_num_tokens, llm.max_input_len)
    if not spec.serving.enable_chunked_context and max_num_tokens < llm.max_input_len:
        raise GpuBuildError(
            f"max_num_tokens {max_num_tokens} < max_input_len {llm.max_input_len} needs "
            "serving.enable_chunked_context = true"
        )
    return LLMBuildSettings(
        family=family,
        tp_size=tp_size,
        pp_size=pp_size,
        dtype=ENGINE_DTYPE,
        checkpoint_dtype=llm.dtype,
        max_batch_size=batch,
        max_input_len=llm.max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_prompt_embedding_table_size=batch * prompt_table_rows_per_request(spec),
    )
