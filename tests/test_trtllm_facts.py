"""The gpu-trtllm profile against what the TensorRT-LLM 1.2.x Triton stack enforces (build_engines/trtllm_facts.py).

Each fact is cited to its upstream source in build_engines/trtllm_facts.py and
docs/trtllm-production-facts.md; these tests hold the rendered gpu repository and
the GPU build plan to them without a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import trtllm_facts as facts
from build_engines.render import TEMPLATE_ROOT, RenderError, load_repository_configs, render_repository
from build_engines.trtllm_plan import plan_gpu_build
from mmtriton.spec import load_spec, spec_from_dict

SPECS = Path(__file__).resolve().parent.parent / "build_engines" / "specs"


@pytest.fixture(scope="module")
def gpu_repo(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gpu-trtllm repository of the tiny bundle (engines planned, not built)."""
    base = tmp_path_factory.mktemp("gpu")
    return render_repository(bundle_dir, base / "repo-gpu", "gpu-trtllm", engines_dir=base / "engines")


def _template_inputs(model: str) -> list[mc.ModelInput]:
    """A template's inputs, read straight from model_repository/ (placeholders only in dims)."""
    text = (TEMPLATE_ROOT / model / "config.pbtxt").read_text()
    inputs = text[text.index("input [") : text.index("output [")]
    config = text_format.Parse(inputs.replace("${llm_hidden_size}", "1"), mc.ModelConfig())
    return list(config.input)


def _llm_params(repo: Path) -> dict[str, str]:
    llm = load_repository_configs(repo)["tensorrt_llm"]
    return {key: value.string_value for key, value in llm.parameters.items()}


# --- item 1: parameters the backend reads unconditionally ----------------------------------


def test_the_required_list_names_the_guided_decoding_keys() -> None:
    """The list holds what getGuidedDecodingConfigFromParams and getBatchingTypeFromParams read without a try."""
    required = {p.name for p in facts.REQUIRED_PARAMETERS}
    assert required == {"gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"}
    assert all(p.required and facts.MODEL_INSTANCE_STATE in p.source for p in facts.REQUIRED_PARAMETERS)
    assert not any(p.required for p in facts.OPTIONAL_PARAMETERS)


def test_rendered_tensorrt_llm_has_every_required_parameter(gpu_repo: Path) -> None:
    params = _llm_params(gpu_repo)
    missing = [p.name for p in facts.REQUIRED_PARAMETERS if p.name not in params]
    assert missing == []
    assert facts.check_backend_parameters(params) == []
    # Guided decoding stays off: an empty backend name and info path are what the backend skips on.
    assert params["guided_decoding_backend"] == "" and params["xgrammar_tokenizer_info_path"] == ""
    assert params["gpt_model_type"] in ("inflight_batching", "inflight_fused_batching")


def test_cpu_profile_gets_none_of_the_backend_only_keys(cpu_repo: Path) -> None:
    params = _llm_params(cpu_repo)
    assert not {"tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"} & set(params)


def test_render_refuses_a_tensorrt_llm_config_without_them(bundle_dir: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATE_ROOT, templates)
    config = templates / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace("${trtllm_backend_parameters}", ""))
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", template_root=templates, engines_dir=tmp_path / "e")
    for name in ("tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"):
        assert f"parameter {name!r} is missing" in str(err.value)
    assert not (tmp_path / "repo").exists()


def test_bool_values_the_backend_cannot_parse_are_named() -> None:
    params = {p.name: "" for p in facts.REQUIRED_PARAMETERS}
    assert facts.check_backend_parameters({**params, "enable_chunked_context": "true"}) == []
    problems = facts.check_backend_parameters({**params, "enable_chunked_context": "yes"})
    assert len(problems) == 1 and "'enable_chunked_context' = 'yes'" in problems[0] and "default false" in problems[0]
    assert facts.check_backend_parameters({**params, "tokenizer_dir": "${tokenizer_dir}"}) != []
    assert facts.parse_bool("FALSE") is False and facts.parse_bool("1") is True
    with pytest.raises(ValueError):
        facts.parse_bool("no")


# --- item 5: prompt-table dtype == engine dtype ---------------------------------------------


def _write_engine_config(engine_dir: Path, dtype: str) -> None:
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = {"pretrained_config": {"dtype": dtype, "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}}}
    (engine_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("spec_name", ["tiny.toml", "tiny-gpu.toml", "glm4-9b-shape.toml"])
def test_every_engine_is_planned_in_the_prompt_table_dtype(spec_name: str, tmp_path: Path) -> None:
    spec = load_spec(SPECS / spec_name)
    plan = plan_gpu_build(spec, tmp_path / "bundle", tmp_path / "engines")
    table = next(i for i in _template_inputs("tensorrt_llm") if i.name == "prompt_embedding_table")
    assert mc.DataType.Name(table.data_type) == "TYPE_FP16"
    assert plan.llm.dtype == "float16" and plan.llm.checkpoint_dtype == spec.llm.dtype
    convert, build = plan.steps[0].argv, plan.steps[1].argv
    assert convert[convert.index("--dtype") + 1] == "float16"
    assert build[build.index("--gpt_attention_plugin") + 1] == "float16"
    assert plan.manifest_data()["llm"]["dtype"] == "float16"


def test_render_refuses_an_engine_whose_dtype_is_not_the_tables(bundle_dir: Path, tmp_path: Path) -> None:
    spec = spec_from_dict(json.loads((bundle_dir / "bundle.json").read_text())["spec"])
    engines = tmp_path / "engines"
    plan = plan_gpu_build(spec, bundle_dir, engines)
    _write_engine_config(plan.engine_dir, "bfloat16")
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", engines_dir=engines)
    assert "prompt_embedding_table is TYPE_FP16 but the engine is bfloat16 (TYPE_BF16)" in str(err.value)
    _write_engine_config(plan.engine_dir, "float16")
    render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", engines_dir=engines)
    (plan.engine_dir / "config.json").write_text("{}")
    with pytest.raises(RenderError, match="no pretrained_config.dtype"):
        render_repository(bundle_dir, tmp_path / "repo2", "gpu-trtllm", engines_dir=engines)


# --- item 6: no KV-cache block reuse across different prompt tables -------------------------


def test_kv_cache_reuse_is_off_in_the_gpu_profile(gpu_repo: Path) -> None:
    params = _llm_params(gpu_repo)
    # Absent, the backend turns reuse on (getKvCacheConfigFromParams): it must be written out as false.
    assert facts.all_parameters()["enable_kv_cache_reuse"].default == "true"
    assert facts.parse_bool(params["enable_kv_cache_reuse"]) is False
    names = {i.name for i in load_repository_configs(gpu_repo)["tensorrt_llm"].input}
    assert "prompt_embedding_table" in names and "prompt_table_extra_ids" not in names


@pytest.mark.parametrize("value", [None, "true", "1", "yes"])
def test_reuse_with_shared_fake_ids_is_refused(gpu_repo: Path, value: str | None) -> None:
    from build_engines.render import check_gpu_profile

    configs = load_repository_configs(gpu_repo)
    llm = configs["tensorrt_llm"]
    if value is None:
        del llm.parameters["enable_kv_cache_reuse"]
    else:
        llm.parameters["enable_kv_cache_reuse"].string_value = value
    problems = check_gpu_profile(configs, "float16")
    assert any("KV-cache block reuse is on" in p for p in problems), problems
    # With per-request extra ids the fake ids differ per table, and reuse is safe.
    llm.input.add(name="prompt_table_extra_ids", data_type=mc.TYPE_UINT64, dims=[-1], optional=True)
    assert not any("KV-cache block reuse" in p for p in check_gpu_profile(configs, "float16"))


# --- item 7: rank 0's GPU models stay on GPU 0 ----------------------------------------------


def test_every_kind_gpu_model_is_pinned_to_gpu_0(gpu_repo: Path, cpu_repo: Path) -> None:
    configs = load_repository_configs(gpu_repo)
    on_gpu = {
        name: [list(g.gpus) for g in config.instance_group]
        for name, config in configs.items()
        if any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    }
    assert set(on_gpu) == {"image_preprocess", "audio_preprocess", "vision_encoder", "audio_encoder"}
    assert all(groups == [[0]] for groups in on_gpu.values()), on_gpu
    # The python encoder and the DALI pipelines run on the device their instance is placed on.
    assert configs["audio_encoder"].parameters["device"].string_value == "cuda:0"
    # Other profiles leave placement to Triton (one GPU, or none).
    assert not any(g.gpus for c in load_repository_configs(cpu_repo).values() for g in c.instance_group)


def test_render_refuses_an_unpinned_gpu_model(bundle_dir: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATE_ROOT, templates)
    config = templates / "vision_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("${instance_gpus}\n", ""))
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", template_root=templates, engines_dir=tmp_path / "e")
    assert "vision_encoder: instance_group[0] is KIND_GPU on gpus all visible" in str(err.value)
    assert "image_preprocess" not in str(err.value)


# --- item 2: every backend the gpu repository names is in the image ------------------------


def test_every_backend_of_the_gpu_repository_is_in_the_image(gpu_repo: Path) -> None:
    from build_engines.image_backends import BASE_IMAGE_BACKENDS, image_backends, missing_backends

    configs = load_repository_configs(gpu_repo)
    used = {c.backend for c in configs.values() if c.platform != "ensemble"}
    assert {c.platform for c in configs.values() if not c.backend} == {"ensemble"}
    assert used == {"tensorrtllm", "python", "dali", "tensorrt"}
    assert missing_backends(used) == []
    assert image_backends() == BASE_IMAGE_BACKENDS | {"dali", "tensorrt"}
    # The base image alone would not serve the DALI pipelines or the TensorRT vision plan.
    assert sorted(used - BASE_IMAGE_BACKENDS) == ["dali", "tensorrt"]


def test_a_dockerfile_without_the_tensorrt_copy_is_caught(tmp_path: Path) -> None:
    from build_engines.image_backends import DOCKERFILE, missing_backends

    text = DOCKERFILE.read_text()
    line = "COPY --from=dali_source /opt/tritonserver/backends/tensorrt /opt/tritonserver/backends/tensorrt\n"
    assert line in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(line, ""))
    assert missing_backends({"tensorrt", "dali", "python", "tensorrtllm"}, broken) == ["tensorrt"]
