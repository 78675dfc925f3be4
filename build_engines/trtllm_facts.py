"""What the TensorRT-LLM 1.2.x Triton stack enforces, kept as data with its upstream source.

The gpu-trtllm profile cannot run on a machine without GPUs, so the rendered repository and
the build plan are checked against these facts instead. Each constant names the file
and function it was read from; ``docs/trtllm-production-facts.md`` lists them with the
tests that rely on them and what stays unproven without a GPU host.

Sources (stored copies of public repositories; the ``v1.2.1`` tag itself is over the
fetch size limit, see ``docs/trtllm-production-facts.md`` for how close each copy is):

- ``NVIDIA/TensorRT-LLM`` commit ``0c8de69a1ca6213eebb20a51873890ff128666c2``
  (``tensorrt_llm/version.py`` = ``1.2.0rc8``), ``triton_backend/inflight_batcher_llm/
  src/model_instance_state.cc``.
- ``NVIDIA/TensorRT-LLM`` commit ``5cdd69218f8815d6c8c101ca1facf2ec4ac4b622``,
  ``triton_backend/inflight_batcher_llm/src/model_state.cc``.
- ``NVIDIA/TensorRT-LLM`` commit ``0ab9d17a59c284d2de36889832fe9fc7c8697604``,
  ``cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention.cu``.
- ``NVIDIA/TensorRT-LLM`` commit ``2a9abd9536aa62ad3e4b9314be9286b1b1be523b``,
  ``cpp/tensorrt_llm/batch_manager/promptTuningBuffers.cpp``, ``PromptTuningBuffers::validate``.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_INSTANCE_STATE = "triton_backend/inflight_batcher_llm/src/model_instance_state.cc"
MODEL_STATE = "triton_backend/inflight_batcher_llm/src/model_state.cc"


@dataclass(frozen=True)
class BackendParameter:
    """One ``parameters`` key the ``tensorrtllm`` backend reads.

    Attributes:
        name: The key in ``config.pbtxt``.
        source: ``file: function`` that reads it.
        required: True when the read is outside any ``try``: a missing key makes
            ``ModelState::GetParameter<std::string>`` throw "Cannot find parameter
            with name" and the model instance fails to load.
        kind: The ``GetParameter<T>`` type: ``string``, ``bool``, ``int``, ``float``.
        default: What the backend uses when an optional key is absent (as text).
    """

    name: str
    source: str
    required: bool
    kind: str = "string"
    default: str | None = None


_MIS = MODEL_INSTANCE_STATE
#: Every key the 1.2.x backend reads with no ``try`` around it (model_instance_state.cc).
REQUIRED_PARAMETERS: tuple[BackendParameter, ...] = (
    BackendParameter("gpt_model_type", f"{_MIS}: ModelInstanceState::getBatchingTypeFromParams", True),
    BackendParameter("tokenizer_dir", f"{_MIS}: ModelInstanceState::getGuidedDecodingConfigFromParams", True),
    BackendParameter(
        "xgrammar_tokenizer_info_path", f"{_MIS}: ModelInstanceState::getGuidedDecodingConfigFromParams", True
    ),
    BackendParameter("guided_decoding_backend", f"{_MIS}: ModelInstanceState::getGuidedDecodingConfigFromParams", True),
)

#: Keys read inside ``try``/``catch``: absent (or unparsable) means the default.
OPTIONAL_PARAMETERS: tuple[BackendParameter, ...] = (
    BackendParameter("max_beam_width", f"{_MIS}: getExecutorConfigFromParams", False, "int", "1"),
    BackendParameter("gpt_model_path", f"{_MIS}: ModelInstanceState::ModelInstanceState", False, "string", ""),
    BackendParameter("encoder_model_path", f"{_MIS}: ModelInstanceState::ModelInstanceState", False, "string", ""),
    BackendParameter(
        "batch_scheduler_policy", f"{_MIS}: getSchedulerConfigFromParams", False, "string", "guaranteed_no_evict"
    ),
    BackendParameter("kv_cache_free_gpu_mem_fraction", f"{_MIS}: getKvCacheConfigFromParams", False, "float", "0.9"),
    BackendParameter("enable_kv_cache_reuse", f"{_MIS}: getKvCacheConfigFromParams", False, "bool", "true"),
    BackendParameter("kv_cache_onboard_blocks", f"{_MIS}: getKvCacheConfigFromParams", False, "bool", "true"),
    BackendParameter("enable_chunked_context", f"{_MIS}: getExecutorConfigFromParams", False, "bool", "false"),
    BackendParameter("normalize_log_probs", f"{_MIS}: getExecutorConfigFromParams", False, "bool", "true"),
    BackendParameter("enable_trt_overlap", f"{_MIS}: getExecutorConfigFromParams", False, "bool", "false"),
    BackendParameter(
        "exclude_input_in_output", f"{_MIS}: ModelInstanceState::ModelInstanceState", False, "bool", "false"
    ),
    BackendParameter(
        "cancellation_check_period_ms", f"{_MIS}: ModelInstanceState::ModelInstanceState", False, "int", "100"
    ),
    BackendParameter("multi_block_mode", f"{_MIS}: getExtendedRuntimePerfKnobConfigFromParams", False, "bool", "true"),
    BackendParameter(
        "enable_context_fmha_fp32_acc", f"{_MIS}: getExtendedRuntimePerfKnobConfigFromParams", False, "bool", "false"
    ),
    BackendParameter("cuda_graph_mode", f"{_MIS}: getExtendedRuntimePerfKnobConfigFromParams", False, "bool", "false"),
    BackendParameter(
        "speculative_decoding_fast_logits", f"{_MIS}: getSpeculativeDecodingConfigFromParams", False, "bool", "false"
    ),
    BackendParameter("gpu_device_ids", f"{MODEL_STATE}: ModelState::LoadParameters", False, "string", ""),
)

#: Text ``ModelState::GetParameter<bool>`` accepts (model_state.cc); anything else throws,
#: and since every bool is read inside ``try``, the backend then silently uses the default.
BOOL_TRUE = ("True", "true", "TRUE", "1")
BOOL_FALSE = ("False", "false", "FALSE", "0")

#: Head sizes the GPT attention plugin's masked multi-head attention (generation phase)
#: has kernels for: ``MMHA_SUPPORTED_HEAD_SIZES`` and the ``switch`` in
#: ``multihead_attention_`` of cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention.cu;
#: any other size fails with "unsupported head_size".
MMHA_HEAD_SIZES: tuple[int, ...] = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)

#: Triton data type of a request's prompt table for each engine dtype. The batch manager
#: allocates its table in the model's dtype and refuses a request table of another dtype
#: ("Request embedding table data type doesn't match model weight data type",
#: ``PromptTuningBuffers::validate`` in cpp/tensorrt_llm/batch_manager/promptTuningBuffers.cpp).
ENGINE_DTYPE_TO_TRITON = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}


def all_parameters() -> dict[str, BackendParameter]:
    """Every parameter listed here by name."""
    return {p.name: p for p in REQUIRED_PARAMETERS + OPTIONAL_PARAMETERS}


def check_backend_parameters(params: dict[str, str]) -> list[str]:
    """Problems the ``tensorrtllm`` backend would have with a model's ``parameters``.

    Args:
        params: ``key -> string_value`` of a rendered ``tensorrt_llm`` config.

    Returns:
        One line per problem: a required key missing, a bool key whose value the
        backend cannot parse (it would fall back to its default without a word),
        or a placeholder left in a value. Empty when the config is fine.
    """
    problems = [
        f"parameter {p.name!r} is missing: {p.source} reads it unconditionally and the model fails to load"
        for p in REQUIRED_PARAMETERS
        if p.name not in params
    ]
    for name, value in params.items():
        known = all_parameters().get(name)
        if known is not None and known.kind == "bool" and value not in BOOL_TRUE + BOOL_FALSE:
            problems.append(
                f"parameter {name!r} = {value!r} is not a bool the backend parses "
                f"({', '.join(BOOL_TRUE + BOOL_FALSE)});"
                f" it would silently use its default {known.default}"
            )
        if "${" in value:
            problems.append(f"parameter {name!r} = {value!r} still holds a placeholder")
    return problems


def parse_bool(value: str) -> bool:
    """A parameter's value as ``GetParameter<bool>`` reads it.

    Raises:
        ValueError: Not one of :data:`BOOL_TRUE` / :data:`BOOL_FALSE`.
    """
    if value in BOOL_TRUE:
        return True
    if value in BOOL_FALSE:
        return False
    raise ValueError(f"{value!r} is not a bool the tensorrtllm backend parses")


def head_size_problem(hidden_size: int, num_attention_heads: int) -> str | None:
    """Why the GPT attention plugin cannot run this model, or None when it can.

    Args:
        hidden_size: The LLM's hidden size.
        num_attention_heads: Its attention heads (head size = hidden / heads).
    """
    if num_attention_heads < 1 or hidden_size % num_attention_heads:
        return f"hidden_size {hidden_size} does not split into {num_attention_heads} attention heads"
    head = hidden_size // num_attention_heads
    if head in MMHA_HEAD_SIZES:
        return None
    return (
        f"head size {head} (hidden_size {hidden_size} / {num_attention_heads} heads) is not supported by the "
        f"TensorRT-LLM GPT attention plugin; supported head sizes: {', '.join(map(str, MMHA_HEAD_SIZES))}"
    )
