"""Render the model repository for one profile from the templates in ``model_repository/``.

Each ``model_repository/<model>/config.pbtxt`` is a template rendered with
strict substitution: a ``${key}`` with no value is an error, never a leftover.
Ensemble configs are generated from :mod:`build_engines.ensembles`. Every
rendered config is parsed with Triton's ``model_config_pb2`` and the ensemble
wiring is checked before any server sees the repository. A repository whose inputs
did not change since it was rendered is left as it is (:mod:`build_engines.render_stamp`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engines.ensembles import Ensemble, all_ensembles, build_ensemble, check_wiring
from build_engines.render_stamp import is_unchanged, render_key, write_render_stamp
from build_engines.trtllm_facts import ENGINE_DTYPE_TO_TRITON, all_parameters, check_backend_parameters, parse_bool
from mmtriton.serving.triton_config import ModelConfigError, parse_model_config
from mmtriton.spec import ModelSpec, prompt_table_rows_per_request, spec_from_dict, with_overrides

LOGGER = logging.getLogger(__name__)

TEMPLATE_ROOT = Path(__file__).resolve().parent.parent / "model_repository"
PREPROCESS_MODELS = ("image_preprocess", "audio_preprocess")
ENCODER_MODELS = ("vision_encoder", "audio_encoder")
LLM_MODELS = ("preprocessing", "tensorrt_llm", "postprocessing")
# Orders the image and audio chains of the two-media ensembles (build_engines/ensembles.py).
ORDERING_MODELS = ("audio_gate",)


class RenderError(RuntimeError):
    """A template, a config or the ensemble wiring is wrong."""


@dataclass(frozen=True)
class Profile:
    """How one profile runs each kind of model.

    Attributes:
        checked_inputs: Put ``image_check`` / ``audio_check`` (python) in front of the
            preprocessing models. Needed where those run on the DALI backend, which
            cannot reject one payload without failing its whole batch.
    """

    name: str
    preprocess_backend: str
    preprocess_kind: str
    vision_backend: str
    audio_backend: str
    encoder_kind: str
    encoder_runtime: str
    llm_backend: str
    llm_device: str
    device_id: int | None
    checked_inputs: bool
    llm_engine: str = "transformers"


PROFILES: dict[str, Profile] = {
    # Everything on the python backend, on the CPU: development, CI, the demo.
    "cpu": Profile("cpu", "python", "KIND_CPU", "python", "python", "KIND_CPU", "onnxruntime", "python", "cpu", None, False),
    # The same python-backend models on one GPU: DALI with device_id 0 ("mixed" decoding,
    # GPU MFCC), encoders in PyTorch, the continuous-batching engine on CUDA.
    "gpu-hf": Profile("gpu-hf", "python", "KIND_GPU", "python", "python", "KIND_GPU", "torch", "python", "cuda", 0, False),
    # Production: the DALI backend serializing 1/dali.py, the vision encoder as a TensorRT
    # plan, the TensorRT-LLM C++ backend (TP=2, in-flight batching). The audio encoder stays
    # on the python backend (PyTorch on the GPU): its padded, masked batch of clips of
    # different lengths does not fit the TensorRT backend's ragged-input convention.
    # The gpu-hf profile's models with vLLM (AsyncLLM, prompt embeddings, CUDA graphs) as the
    # engine behind the same tensorrt_llm contract.
    "gpu-vllm": Profile("gpu-vllm", "python", "KIND_GPU", "python", "python", "KIND_GPU", "torch", "python", "cuda", 0, False, "vllm"),
    "gpu-trtllm": Profile("gpu-trtllm", "dali", "KIND_GPU", "tensorrt", "python", "KIND_GPU", "torch", "tensorrtllm", "cuda", 0, True),
}
CHECK_MODELS = ("image_check", "audio_check")


def render_template(path: Path, values: dict[str, str]) -> str:
    """Substitute ``${key}`` placeholders strictly.

    Args:
        path: Template file.
        values: Placeholder values.

    Returns:
        The rendered text.

    Raises:
        RenderError: A placeholder has no value, or the template has a malformed ``$``.
    """
    template = string.Template(path.read_text())
    try:
        return template.substitute(values)
    except KeyError as err:
        raise RenderError(f"{path}: no value for placeholder ${{{err.args[0]}}}") from None
    except ValueError as err:
        raise RenderError(f"{path}: {err}") from None


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's own protobuf schema (:mod:`mmtriton.serving.triton_config`).

    Raises:
        RenderError: The text is not a valid ``ModelConfig``.
    """
    try:
        return parse_model_config(text, where)
    except ModelConfigError as err:
        raise RenderError(str(err)) from None


def template_values(spec: ModelSpec, bundle: dict[str, Any], profile: Profile) -> dict[str, str]:
    """Every placeholder value the templates may use, as strings."""
    serving = spec.serving
    llm_dir = (Path(bundle["dir"]) / "llm").resolve()
    token_ids = bundle["token_ids"]
    # Room for every running request's image and longest audio clip at once.
    rows_per_request = prompt_table_rows_per_request(spec)
    values: dict[str, Any] = {
        "max_batch_size": serving.max_batch_size,
        "max_queue_delay_us": serving.max_queue_delay_us,
        "preprocess_instances": serving.preprocess_instances,
        "encoder_instances": serving.encoder_instances,
        "preprocess_backend": profile.preprocess_backend,
        "preprocess_kind": profile.preprocess_kind,
        "vision_encoder_backend": profile.vision_backend,
        "audio_encoder_backend": profile.audio_backend,
        "encoder_kind": profile.encoder_kind,
        "encoder_runtime": profile.encoder_runtime,
        "encoder_device": "cpu" if profile.device_id is None else f"cuda:{profile.device_id}",
        "dali_num_threads": 2,
        "image_size": spec.vision.image_size,
        "image_max_bytes": spec.vision.max_bytes,
        "image_max_pixels": spec.vision.max_pixels,
        "audio_max_bytes": spec.audio.max_bytes,
        "audio_max_seconds": spec.audio.max_seconds,
        "image_tokens": spec.vision.tokens_per_image,
        "n_mfcc": spec.audio.n_mfcc,
        "llm_hidden_size": bundle["llm_hidden_size"],
        "llm_backend": profile.llm_backend,
        "llm_device": profile.llm_device,
        "llm_queue_delay_us": serving.llm_queue_delay_us,
        "llm_max_queue_size": serving.llm_max_queue_size,
        "batching_strategy": "inflight_fused_batching",
        "batch_scheduler_policy": serving.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": serving.kv_cache_free_gpu_mem_fraction,
        "enable_chunked_context": str(serving.enable_chunked_context).lower(),
        "cancellation_check_period_ms": serving.cancellation_check_period_ms,
        "engine_dir": llm_dir,
        "tokenizer_dir": llm_dir,
        "vocab_size": bundle["vocab_size"],
        "image_token": spec.tokenizer.image_token,
        "audio_token": spec.tokenizer.audio_token,
        # Chat turns end with <|end|> when the tokenizer has one; otherwise with eos.
        "end_id": token_ids.get("end", token_ids["eos"]),
        "pad_id": token_ids["pad"],
        "max_input_len": spec.llm.max_input_len,
        "max_output_len": spec.llm.max_output_len,
        "prompt_table_capacity": serving.max_batch_size * rows_per_request,
        # Placeholders that render to nothing outside the gpu-trtllm profile (see gpu_profile_values).
        "trtllm_backend_parameters": "",
        "instance_gpus": "",
        "python_engine_parameters": "",
    }
    values = {key: str(value) for key, value in values.items()}
    if profile.llm_backend == "tensorrtllm":
        values.update(gpu_profile_values(values, profile))
    else:
        values["python_engine_parameters"] = parameters_block(python_engine_parameters(spec, profile, values["vocab_size"]))
        if profile.device_id is not None:
            # gpu-hf / gpu-vllm: the KIND_GPU models (DALI, encoders) on the profile's GPU only; unpinned,
            # Triton would give them an instance on every visible GPU, beside vLLM's other TP ranks.
            values["instance_gpus"] = f"    gpus: [ {profile.device_id} ]"
    return values


def python_engine_parameters(spec: ModelSpec, profile: Profile, vocab_size: str) -> dict[str, str]:
    """Which engine the python ``tensorrt_llm`` model runs, and its settings from the spec.

    Both engines: ``stream_chunk_rate`` (streamed responses per second over all
    requests; 0 sends every engine step). vLLM: ``max_num_seqs`` is the spec's
    ``max_batch_size`` (the same batch the transformers engine runs),
    ``max_model_len`` the longest prompt plus answer; tensor parallel size, GPU
    memory share, CUDA graphs and prefix caching (vLLM hashes prompt embeddings too)
    come from ``[serving]``.
    """
    serving = spec.serving
    params = {"engine": profile.llm_engine, "stream_chunk_rate": str(serving.stream_chunk_rate)}
    if profile.llm_engine == "vllm":
        params.update(
            {
                "vocab_size": vocab_size,
                "max_model_len": str(spec.llm.max_input_len + spec.llm.max_output_len),
                "tensor_parallel_size": str(serving.tensor_parallel_size),
                "gpu_memory_utilization": str(serving.gpu_memory_utilization),
                "enforce_eager": str(serving.enforce_eager).lower(),
                "enable_prefix_caching": str(serving.enable_prefix_caching).lower(),
            }
        )
    return params


def parameters_block(params: dict[str, str]) -> str:
    """``parameters: { key: ... value: { string_value: ... } }`` entries, one per key, in order."""
    def quoted(text: str) -> str:
        # JSON string escapes are valid protobuf text-format escapes.
        return json.dumps(text, ensure_ascii=False)

    entries = [
        f"parameters: {{\n  key: {quoted(key)}\n  value: {{ string_value: {quoted(value)} }}\n}}"
        for key, value in params.items()
    ]
    return "\n".join(entries)


def tensorrtllm_backend_parameters(values: dict[str, str]) -> dict[str, str]:
    """Keys only the ``tensorrtllm`` backend reads, added to ``tensorrt_llm`` in the gpu-trtllm profile.

    ``tokenizer_dir``, ``xgrammar_tokenizer_info_path`` and ``guided_decoding_backend``
    are read unconditionally by ``getGuidedDecodingConfigFromParams`` (a missing key fails
    the model load; :mod:`build_engines.trtllm_facts`). Empty backend and info path leave
    guided decoding off; the C++ workflow logs and ignores ``tokenizer_dir``.

    ``enable_kv_cache_reuse`` is off: the backend turns block reuse on when the key is
    absent, and every multimodal request carries the same fake prompt ids with no
    ``prompt_table_extra_ids``, so a later request with another image but the same
    prefix would reuse KV blocks computed from an earlier request's embeddings.
    """
    return {
        "tokenizer_dir": values["tokenizer_dir"],
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
        "enable_kv_cache_reuse": "false",
    }


def gpu_profile_values(values: dict[str, str], profile: Profile) -> dict[str, str]:
    """Placeholder values only the gpu-trtllm profile fills (they render to nothing elsewhere).

    ``instance_gpus`` pins the KIND_GPU instances (DALI, encoders) to rank 0's GPU: the TP
    launcher shows every rank all GPUs, and unpinned KIND_GPU models get an instance on
    each visible GPU, beside rank 1's KV cache.
    """
    return {
        "trtllm_backend_parameters": parameters_block(tensorrtllm_backend_parameters(values)),
        "instance_gpus": f"    gpus: [ {profile.device_id} ]",
    }


def check_gpu_profile(models: dict[str, mc.ModelConfig], engine_dtype: str, gpu: int = 0) -> list[str]:
    """What the TensorRT-LLM 1.2.x stack would refuse in a rendered gpu-trtllm repository.

    Args:
        models: The rendered non-ensemble configs by model name.
        engine_dtype: Dtype of the engine's weights (``float16``, ``bfloat16``, ``float32``):
            the built engine's ``config.json`` when it exists, else the build plan's.
        gpu: Rank 0's GPU: every KIND_GPU instance group must be pinned to it alone.

    Returns:
        One line per problem (empty when none).
    """
    problems: list[str] = []
    for name, config in models.items():
        for index, group in enumerate(config.instance_group):
            if group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) != [gpu]:
                problems.append(
                    f"{name}: instance_group[{index}] is KIND_GPU on gpus {list(group.gpus) or 'all visible'}; "
                    f"rank 0's models must be pinned to GPU {gpu} (gpus: [ {gpu} ]), the other GPUs hold "
                    "the other ranks' KV caches"
                )
    llm = models["tensorrt_llm"]
    params = {key: value.string_value for key, value in llm.parameters.items()}
    problems += [f"tensorrt_llm: {problem}" for problem in check_backend_parameters(params)]
    table = next((i for i in llm.input if i.name == "prompt_embedding_table"), None)
    extra_ids = any(i.name == "prompt_table_extra_ids" for i in llm.input)
    if table is not None and not extra_ids:
        reuse = params.get("enable_kv_cache_reuse", all_parameters()["enable_kv_cache_reuse"].default or "")
        try:
            reused = parse_bool(reuse)
        except ValueError:
            reused = True  # unparsable: the backend falls back to its default, on
        if reused:
            problems.append(
                "tensorrt_llm: KV-cache block reuse is on (enable_kv_cache_reuse absent or true) but requests carry "
                "prompt tables without prompt_table_extra_ids: requests with the same fake prompt ids would reuse "
                "KV computed from another request's embeddings; set enable_kv_cache_reuse to false"
            )
    if table is not None:
        table_type = mc.DataType.Name(table.data_type)
        wanted = ENGINE_DTYPE_TO_TRITON.get(engine_dtype)
        if table_type != wanted:
            problems.append(
                f"tensorrt_llm: prompt_embedding_table is {table_type} but the engine is {engine_dtype} "
                f"({wanted}); the batch manager refuses a prompt table whose dtype differs from the engine's"
            )
    return problems


def preprocess_settings(spec: ModelSpec, model: str, profile: Profile, num_threads: int) -> dict[str, Any]:
    """The ``preprocess.json`` a ``dali.py`` reads: constants from the spec plus the device."""
    common = {"max_batch_size": spec.serving.max_batch_size, "num_threads": num_threads, "device_id": profile.device_id}
    on_gpu = profile.device_id is not None
    if model == "image_preprocess":
        v = spec.vision
        return {
            **common,
            "decoder_device": "mixed" if on_gpu else "cpu",
            "image_size": v.image_size,
            "mean": list(v.mean),
            "std": list(v.std),
            "max_bytes": v.max_bytes,
            "max_pixels": v.max_pixels,
        }
    a = spec.audio
    return {
        **common,
        "device": "gpu" if on_gpu else "cpu",
        "sample_rate": a.sample_rate,
        "n_fft": a.n_fft,
        "hop_length": a.hop_length,
        "n_mels": a.n_mels,
        "n_mfcc": a.n_mfcc,
        "preemphasis": a.preemphasis,
        "cutoff_db": a.cutoff_db,
        "norm_epsilon": a.norm_epsilon,
        "max_bytes": a.max_bytes,
        "max_seconds": a.max_seconds,
        "max_frames": a.max_frames,
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def load_repository_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """Parse every ``<model>/config.pbtxt`` of a rendered repository."""
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = parse_config(path.read_text(), str(path))
    return configs


def verify_repository(repo: Path) -> dict[str, mc.ModelConfig]:
    """Parse every config and check the ensemble wiring of a rendered repository.

    Raises:
        RenderError: A config does not parse, a name does not match its folder,
            or the wiring has problems (all of them are listed).
    """
    configs = load_repository_configs(repo)
    problems = [f"{name}: config name is {c.name!r}" for name, c in configs.items() if c.name != name]
    problems += check_wiring(configs)
    if problems:
        raise RenderError(f"{repo}: wiring check failed:\n  " + "\n  ".join(problems))
    return configs


def render_repository(
    bundle_dir: Path,
    out_dir: Path,
    profile_name: str = "cpu",
    *,
    template_root: Path = TEMPLATE_ROOT,
    ensembles: tuple[Ensemble, ...] | None = None,
    overrides: dict[str, str] | None = None,
    engines_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Render a complete model repository for a bundle and a profile.

    Nothing is written when ``out_dir`` was rendered from the same inputs and is as that
    render left it (:mod:`build_engines.render_stamp`); one log line says so.

    Args:
        bundle_dir: A bundle built by :func:`build_engines.bundle.build_bundle`.
        out_dir: Repository folder to (re)create.
        profile_name: One of :data:`PROFILES` (``cpu``, ``gpu-hf``, ``gpu-vllm``, ``gpu-trtllm``).
        template_root: Folder of model templates (tests point it at broken copies).
        ensembles: Ensemble descriptions to generate (default: the profile's).
        overrides: Serving-time spec changes for this repository only, as
            ``{"serving.max_batch_size": "1"}`` (the bundle is not rebuilt).
        engines_dir: ``gpu-trtllm`` profile: the output folder of ``python -m build_engines.trtllm_build``;
            the engine and plan paths of the build there go into the configs
            (:func:`build_engines.trtllm_plan.plan_for_engines`; plans not built yet
            are reported, not fatal: the configs can be checked before any GPU build).
        force: Render even when nothing changed.

    Returns:
        ``out_dir``, after every config parsed and the wiring check passed.

    Raises:
        RenderError: Unknown profile, a template problem, or a wiring problem.
    """
    if profile_name not in PROFILES:
        raise RenderError(f"unknown profile {profile_name!r}; choose from {sorted(PROFILES)}")
    profile = PROFILES[profile_name]
    bundle = {**json.loads((bundle_dir / "bundle.json").read_text()), "dir": str(bundle_dir)}
    spec = spec_from_dict(bundle["spec"])
    if overrides:
        spec = with_overrides(spec, overrides)
    values = template_values(spec, bundle, profile)
    vision_plan = None
    engine_files: list[Path] = []
    if profile.llm_backend == "tensorrtllm":
        if engines_dir is None:
            raise RenderError("the gpu-trtllm profile needs --engines (the folder python -m build_engines.trtllm_build writes)")
        from build_engines.trtllm_plan import MANIFEST_NAME, plan_for_engines
        from build_engines.trtllm_settings import GpuBuildError
        from mmtriton.serving.engine_folder import EngineConfigError, read_engine_dtype

        try:
            plan = plan_for_engines(spec, bundle_dir, Path(engines_dir))
        except GpuBuildError as err:
            raise RenderError(str(err)) from None
        values["engine_dir"] = str(plan.engine_dir.resolve())
        vision_plan = plan.vision_plan
        engine_files = [Path(engines_dir) / MANIFEST_NAME, plan.engine_dir / "config.json"]
        try:
            engine_dtype = read_engine_dtype(plan.engine_dir) or plan.llm.dtype
        except EngineConfigError as err:
            raise RenderError(str(err)) from None
        if not (plan.engine_dir / "config.json").is_file():
            # The backend drops a gpt_model_path that does not exist and then fails with
            # "Both encoder and decoder model paths are empty" (model_instance_state.cc).
            LOGGER.warning("tensorrt_llm: engine %s not built yet (needs a GPU); config only", plan.engine_dir)
    key = render_key(
        bundle_dir,
        profile.name,
        overrides or {},
        template_root,
        ensembles=ensembles,
        engine_files=engine_files,
        plan_files=[vision_plan] if vision_plan is not None else [],
    )
    if not force and is_unchanged(out_dir, key):
        LOGGER.info(
            "%s is up to date: bundle, spec, profile, templates and renderer unchanged since its last render; skipped",
            out_dir,
        )
        return out_dir
    if ensembles is None:
        ensembles = all_ensembles(checked=profile.checked_inputs)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    models: dict[str, mc.ModelConfig] = {}
    checks = CHECK_MODELS if profile.checked_inputs else ()
    for model in checks + PREPROCESS_MODELS + ENCODER_MODELS + ORDERING_MODELS + LLM_MODELS:
        src = template_root / model
        text = render_template(src / "config.pbtxt", values)
        config = parse_config(text, f"{src / 'config.pbtxt'} (rendered)")
        models[model] = config
        version = staging / model / "1"
        version.mkdir(parents=True)
        (staging / model / "config.pbtxt").write_text(text)
        if model in PREPROCESS_MODELS:
            shutil.copy2(src / "1" / "dali.py", version / "dali.py")
            settings = preprocess_settings(spec, model, profile, int(values["dali_num_threads"]))
            (version / "preprocess.json").write_text(json.dumps(settings, indent=2) + "\n")
        elif model == "vision_encoder" and config.backend == "tensorrt":
            if vision_plan is not None and vision_plan.exists():
                _link_or_copy(vision_plan, version / "model.plan")
            else:
                LOGGER.warning("vision_encoder: TensorRT plan %s not built yet (needs a GPU); config only", vision_plan)
        elif model in ENCODER_MODELS and profile.encoder_runtime == "torch":
            _link_or_copy(bundle_dir / model / "model.safetensors", version / "model.safetensors")
            info = {"spec": bundle["spec"], "llm_hidden_size": bundle["llm_hidden_size"]}
            (version / "encoder.json").write_text(json.dumps(info, indent=2) + "\n")
        elif model in ENCODER_MODELS:
            _link_or_copy(bundle_dir / model / "model.onnx", version / "model.onnx")
        if config.backend == "python":
            shutil.copy2(src / "1" / "model.py", version / "model.py")

    if profile.llm_backend == "tensorrtllm":
        problems = check_gpu_profile(models, engine_dtype, profile.device_id or 0)
        if problems:
            raise RenderError("the gpu-trtllm profile repository would not load:\n  " + "\n  ".join(problems))

    for ensemble in ensembles:
        try:
            config = build_ensemble(ensemble, models, spec.serving.max_batch_size)
        except KeyError as err:
            raise RenderError(f"ensemble description: {err.args[0]}") from None
        (staging / ensemble.name / "1").mkdir(parents=True)
        (staging / ensemble.name / "config.pbtxt").write_text(text_format.MessageToString(config))

    verify_repository(staging)
    manifest = {
        "profile": profile.name,
        "spec": spec.name,
        "bundle": str(bundle_dir.resolve()),
        "overrides": overrides or {},
    }
    (staging / "repository.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_render_stamp(staging, key)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    LOGGER.info("rendered %s profile repository for %s into %s", profile.name, spec.name, out_dir)
    return out_dir
