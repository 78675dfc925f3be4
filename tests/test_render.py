"""Rendering: strict templates, Triton's protobuf schema, and the ensemble wiring check."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from build_engines.__main__ import main as build_engines_main
from build_engines.ensembles import ENSEMBLES, Ensemble, Step, check_wiring
from build_engines.render import TEMPLATE_ROOT, RenderError, load_repository_configs, render_repository
from build_engines.render_stamp import STAMP_NAME
from mmtriton.spec import ModelSpec, spec_from_dict

SKIPPED = "unchanged since its last render; skipped"


@pytest.fixture()
def templates(tmp_path: Path) -> Path:
    """A private copy of the model templates that a test may break."""
    dest = tmp_path / "templates"
    shutil.copytree(TEMPLATE_ROOT, dest)
    return dest


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _mtimes(repo: Path) -> dict[str, int]:
    """Modification time of every file of a rendered repository, the stamp included."""
    return {p.relative_to(repo).as_posix(): p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}


def test_rendered_repository_is_complete(cpu_repo: Path, spec: ModelSpec) -> None:
    configs = load_repository_configs(cpu_repo)
    assert set(configs) == {
        "image_preprocess",
        "audio_preprocess",
        "vision_encoder",
        "audio_encoder",
        "preprocessing",
        "tensorrt_llm",
        "postprocessing",
        "audio_gate",
        *(e.name for e in ENSEMBLES),
    }
    assert check_wiring(configs) == []
    # The spec's values, not the templates' placeholders, are what the configs hold.
    serving = spec.serving
    for name, config in configs.items():
        assert config.max_batch_size == serving.max_batch_size, name
        if name in ("image_preprocess", "audio_preprocess", "vision_encoder", "audio_encoder"):
            assert config.dynamic_batching.max_queue_delay_microseconds == serving.max_queue_delay_us, name
        if config.backend == "python":
            assert (cpu_repo / name / "1" / "model.py").exists()
    assert configs["tensorrt_llm"].dynamic_batching.max_queue_delay_microseconds == serving.llm_queue_delay_us
    # postprocessing must see cancelled requests (a dynamic batcher would fail them): see mmtriton/backend/cancellation.py.
    assert not configs["postprocessing"].HasField("dynamic_batching")
    size = spec.vision.image_size
    assert list(configs["image_preprocess"].output[0].dims) == [3, size, size]
    assert list(configs["vision_encoder"].input[0].dims) == [3, size, size]
    assert list(configs["audio_preprocess"].output[0].dims) == [-1, spec.audio.n_mfcc]
    params = {k: v.string_value for k, v in configs["preprocessing"].parameters.items()}
    assert params["hidden_size"] == str(spec.llm.hidden_size)
    assert params["image_token"] == spec.tokenizer.image_token and params["audio_token"] == spec.tokenizer.audio_token
    assert params["max_input_len"] == str(spec.llm.max_input_len)
    assert params["max_output_len"] == str(spec.llm.max_output_len)
    llm = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    assert llm["batch_scheduler_policy"] == serving.batch_scheduler_policy
    assert float(llm["kv_cache_free_gpu_mem_fraction"]) == serving.kv_cache_free_gpu_mem_fraction
    assert llm["cancellation_check_period_ms"] == str(serving.cancellation_check_period_ms)
    for name in ("image_preprocess", "audio_preprocess"):
        assert (cpu_repo / name / "1" / "dali.py").exists()
        assert (cpu_repo / name / "1" / "preprocess.json").exists()
    # Ragged raw-byte inputs with dynamic batching, as the DALI backend needs them.
    image_in = configs["image_preprocess"].input[0]
    assert (image_in.data_type, list(image_in.dims), image_in.allow_ragged_batch) == (2, [-1], True)  # TYPE_UINT8
    assert configs["image_preprocess"].HasField("dynamic_batching")


def test_missing_template_key_fails_the_build(bundle_dir: Path, templates: Path, tmp_path: Path) -> None:
    _edit(templates / "vision_encoder" / "config.pbtxt", "max_batch_size: ${max_batch_size}", "max_batch_size: ${max_batch}")
    with pytest.raises(RenderError, match=r"vision_encoder/config.pbtxt: no value for placeholder \$\{max_batch\}"):
        render_repository(bundle_dir, tmp_path / "repo", template_root=templates)
    assert not (tmp_path / "repo").exists()


def test_unknown_config_field_fails_the_build(bundle_dir: Path, templates: Path, tmp_path: Path) -> None:
    _edit(templates / "audio_encoder" / "config.pbtxt", "max_batch_size:", "max_batch_sise:")
    with pytest.raises(RenderError, match=r"audio_encoder/config.pbtxt \(rendered\): not a valid Triton ModelConfig"):
        render_repository(bundle_dir, tmp_path / "repo", template_root=templates)


def test_dtype_mismatch_between_steps_is_caught(bundle_dir: Path, templates: Path, tmp_path: Path) -> None:
    _edit(templates / "vision_encoder" / "config.pbtxt", "data_type: TYPE_FP16", "data_type: TYPE_FP32")
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", template_root=templates)
    assert "image_preprocess.pixel_values is TYPE_FP16 but vision_encoder.pixel_values expects TYPE_FP32" in str(err.value)


def test_wrong_tensor_name_in_description_is_caught(bundle_dir: Path, tmp_path: Path) -> None:
    broken = Ensemble(
        "embed_image",
        ("image",),
        (
            Step("image_preprocess", {"image": "image"}, {"pixel_values": "_pixels"}),
            Step("vision_encoder", {"pixel_values": "_pixel_values"}, {"embeddings": "image_embeddings"}),
        ),
        ("image_embeddings",),
    )
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", ensembles=(broken,))
    assert "vision_encoder.pixel_values reads '_pixel_values', which no step produces" in str(err.value)


def test_hand_edited_ensemble_is_caught(cpu_repo: Path) -> None:
    configs = load_repository_configs(cpu_repo)
    ens = configs["embed_audio"]
    # Feed the encoder's length input from the wrong tensor and drop a required input.
    step = ens.ensemble_scheduling.step[1]
    step.input_map["feature_length"] = "_mfcc"
    del step.input_map["features"]
    problems = check_wiring(configs)
    assert any("audio_preprocess.mfcc is TYPE_FP32 but audio_encoder.feature_length expects TYPE_INT32" in p for p in problems)
    assert any("required input audio_encoder.features is not fed" in p for p in problems)
    assert any("audio_preprocess.mfcc_length goes to '_mfcc_length', which nothing reads" in p for p in problems)
    # And an output declared with the wrong dims.
    configs = load_repository_configs(cpu_repo)
    text_format.Parse('output { name: "extra" data_type: TYPE_FP16 dims: [ 3 ] }', configs["embed_image"])
    assert any("output 'extra' is never produced" in p for p in check_wiring(configs))


def test_parallel_media_chains_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    """Image and audio chains side by side (the old two-media wiring) fail the render, naming the pair."""
    from build_engines.ensembles import audio_steps, image_steps

    parallel = Ensemble(
        "embed_image_audio",
        ("image", "audio"),
        image_steps(checked=False) + audio_steps(checked=False),
        ("image_embeddings", "audio_embeddings"),
    )
    with pytest.raises(RenderError) as err:
        render_repository(bundle_dir, tmp_path / "repo", ensembles=(parallel,))
    assert "steps 'image_preprocess' and 'audio_preprocess' can run at the same time" in str(err.value)


@pytest.mark.parametrize("profile", ["cpu", "gpu-trtllm"])
def test_every_shipped_ensemble_is_one_chain(profile: str) -> None:
    """Every pair of steps in every ensemble is ordered by data (the two-media ones through audio_gate)."""
    from build_engines.ensembles import all_ensembles, concurrent_steps

    for ens in all_ensembles(checked=profile == "gpu-trtllm"):
        steps = [
            mc_step(step.model, step.inputs, step.outputs) for step in ens.steps
        ]
        assert concurrent_steps(steps) == [], ens.name
    both = {e.name: [s.model for s in e.steps] for e in all_ensembles(checked=profile == "gpu-trtllm")}
    assert both["chat_image_audio"].index("audio_gate") == both["chat_image_audio"].index("vision_encoder") + 1


def mc_step(model: str, inputs: dict[str, str], outputs: dict[str, str]):
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=inputs, output_map=outputs)


def test_gpu_repository_renders_in_full(bundle_dir: Path, tmp_path: Path) -> None:
    """The production profile from the same templates: schema and wiring pass, every field explicit."""
    from build_engines.trtllm_plan import plan_gpu_build
    from mmtriton.spec import spec_from_dict

    engines = tmp_path / "engines"
    repo = render_repository(bundle_dir, tmp_path / "repo-gpu", "gpu-trtllm", engines_dir=engines)
    configs = load_repository_configs(repo)
    assert check_wiring(configs) == []
    llm = configs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in llm.parameters.items()}
    spec = spec_from_dict(__import__("json").loads((bundle_dir / "bundle.json").read_text())["spec"])
    plan = plan_gpu_build(spec, bundle_dir, engines)
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(plan.engine_dir.resolve())
    assert params["exclude_input_in_output"] == "true"
    for key in ("batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction", "enable_chunked_context",
                "cancellation_check_period_ms"):
        assert params[key] and "$" not in params[key]
    for name in ("image_preprocess", "audio_preprocess"):
        dali = configs[name]
        assert dali.backend == "dali" and dali.instance_group[0].kind == dali.instance_group[0].KIND_GPU
        assert (repo / name / "1" / "dali.py").exists() and not (repo / name / "1" / "model.py").exists()
        # Auto-complete is off under the TP launcher: ragged inputs must be written out.
        assert all(i.allow_ragged_batch for i in dali.input)
    settings = __import__("json").loads((repo / "image_preprocess" / "1" / "preprocess.json").read_text())
    assert settings["decoder_device"] == "mixed" and settings["device_id"] == 0
    assert configs["vision_encoder"].backend == "tensorrt"
    assert configs["audio_encoder"].backend == "python"
    # In front of DALI, the python checks reject bad payloads one request at a time.
    steps = [s.model_name for s in configs["chat_image_audio"].ensemble_scheduling.step]
    assert steps.index("image_check") < steps.index("image_preprocess")
    assert steps.index("audio_check") < steps.index("audio_preprocess")
    assert configs["audio_check"].parameters["full_decode"].string_value == "true"
    for config in configs.values():
        for tensor in list(config.input) + list(config.output):
            assert tensor.data_type != 0 and len(tensor.dims) > 0, (config.name, tensor.name)


def test_cuda_profile_encoders_match_onnx(bundle_dir: Path, tmp_path: Path) -> None:
    """The gpu-hf profile runs the encoders' safetensors in PyTorch: same outputs as the ONNX files."""
    import numpy as np

    from mmtriton.encoders.batching import encode_audio, encode_images, load_encoder

    repo = render_repository(bundle_dir, tmp_path / "repo-gpu-hf", "gpu-hf")
    cpu = {"runtime": "torch", "device": "cpu"}  # the rendered device is cuda:0; CI has no GPU
    vision = load_encoder(repo / "vision_encoder" / "1", "vision_encoder", cpu)
    audio = load_encoder(repo / "audio_encoder" / "1", "audio_encoder", cpu)
    rng = np.random.default_rng(3)
    pixels = [rng.normal(size=(3, 64, 64)).astype(np.float16) for _ in range(2)]
    frames = [rng.normal(size=(n, 40)).astype(np.float32) for n in (50, 17)]
    onnx_vision = load_encoder(bundle_dir / "vision_encoder", "vision_encoder", {"runtime": "onnxruntime"})
    onnx_audio = load_encoder(bundle_dir / "audio_encoder", "audio_encoder", {"runtime": "onnxruntime"})
    for got, want in zip(encode_images(vision, pixels), encode_images(onnx_vision, pixels)):
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    for got, want in zip(encode_audio(audio, frames, [50, 17]), encode_audio(onnx_audio, frames, [50, 17])):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)


# --- re-rendering only what changed ------------------------------------------------------------


def test_an_unchanged_render_is_skipped(
    bundle_dir: Path, templates: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rendering twice writes nothing the second time and says so; a changed template or spec renders again."""
    caplog.set_level(logging.INFO, logger="build_engines")
    repo = render_repository(bundle_dir, tmp_path / "repo", template_root=templates)
    assert (repo / STAMP_NAME).is_file() and SKIPPED not in caplog.text
    before = _mtimes(repo)
    assert len(before) > 20

    caplog.clear()
    assert render_repository(bundle_dir, repo, template_root=templates) == repo
    assert _mtimes(repo) == before
    skipped = [r.getMessage() for r in caplog.records if SKIPPED in r.getMessage()]
    assert skipped == [f"{repo} is up to date: bundle, spec, profile, templates and renderer {SKIPPED}"]

    # A template changed: rendered again, with the change.
    _edit(templates / "vision_encoder" / "config.pbtxt", "max_batch_size: ${max_batch_size}", "max_batch_size: 2")
    caplog.clear()
    render_repository(bundle_dir, repo, template_root=templates)
    assert SKIPPED not in caplog.text and "rendered cpu profile repository" in caplog.text
    assert load_repository_configs(repo)["vision_encoder"].max_batch_size == 2
    assert _mtimes(repo)["vision_encoder/config.pbtxt"] != before["vision_encoder/config.pbtxt"]

    # A spec value changed (an override here; a changed spec file changes bundle.json, see below): again.
    render_repository(bundle_dir, repo, template_root=templates)
    caplog.clear()
    render_repository(bundle_dir, repo, template_root=templates, overrides={"serving.max_queue_delay_us": "3000"})
    assert SKIPPED not in caplog.text
    assert load_repository_configs(repo)["audio_encoder"].dynamic_batching.max_queue_delay_microseconds == 3000

    # Another profile, a hand-edited output and force each render again too.
    for kwargs in ({"profile_name": "gpu-hf"}, {"profile_name": "gpu-hf", "force": True}):
        caplog.clear()
        render_repository(bundle_dir, repo, template_root=templates, **kwargs)
        assert SKIPPED not in caplog.text, kwargs
    config = repo / "tensorrt_llm" / "config.pbtxt"
    rendered = config.read_text()
    config.write_text(rendered.replace("max_batch_size", "max_batch_sise"))
    caplog.clear()
    render_repository(bundle_dir, repo, "gpu-hf", template_root=templates)
    assert SKIPPED not in caplog.text and config.read_text() == rendered


def test_build_engines_all_skips_an_unchanged_bundle_and_repository(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What make serve runs before every start: the second run leaves every file alone; a spec change rebuilds."""
    spec_path = tmp_path / "tiny.toml"
    shutil.copy(Path(__file__).resolve().parents[1] / "build_engines" / "specs" / "tiny.toml", spec_path)
    argv = ["all", "--spec", str(spec_path), "--profile", "cpu", "--build-dir", str(tmp_path / "build")]
    repo = tmp_path / "build" / "repo-cpu-tiny-mm"
    caplog.set_level(logging.INFO, logger="build_engines")
    assert build_engines_main(argv) == 0
    before = _mtimes(repo)
    bundle_json = (tmp_path / "build" / "bundles" / "tiny-mm" / "bundle.json").stat().st_mtime_ns

    caplog.clear()
    assert build_engines_main(argv) == 0
    assert _mtimes(repo) == before
    assert (tmp_path / "build" / "bundles" / "tiny-mm" / "bundle.json").stat().st_mtime_ns == bundle_json
    assert "already built for spec 'tiny-mm'; skipping" in caplog.text and SKIPPED in caplog.text

    _edit(spec_path, "max_queue_delay_us = 2000", "max_queue_delay_us = 2500")
    caplog.clear()
    assert build_engines_main(argv) == 0
    assert SKIPPED not in caplog.text and "bundle" in caplog.text and "built in" in caplog.text
    assert load_repository_configs(repo)["vision_encoder"].dynamic_batching.max_queue_delay_microseconds == 2500


def test_gpu_render_finds_the_engine_the_build_wrote(bundle_dir: Path, tmp_path: Path) -> None:
    """The engine folder the render points at is the one gpu_build.json records, whatever --tp-size built it."""
    from build_engines.trtllm_plan import plan_gpu_build
    from build_engines.trtllm_settings import TP_SIZE

    spec = spec_from_dict(json.loads((bundle_dir / "bundle.json").read_text())["spec"])
    engines = tmp_path / "engines"
    default = plan_gpu_build(spec, bundle_dir, engines)
    built = plan_gpu_build(spec, bundle_dir, engines, tp_size=4)
    assert default.llm.tp_size == TP_SIZE == 2 and built.engine_dir != default.engine_dir

    def gpt_model_path(repo: Path) -> str:
        return load_repository_configs(repo)["tensorrt_llm"].parameters["gpt_model_path"].string_value

    # Nothing built yet: the default plan's folder.
    assert gpt_model_path(render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", engines_dir=engines)) == str(
        default.engine_dir.resolve()
    )
    # A TP=4 build finished there (its engine config and manifest, as run_plan leaves them).
    built.engine_dir.mkdir(parents=True)
    mapping = {"world_size": 4, "tp_size": 4, "pp_size": 1, "cp_size": 1}
    (built.engine_dir / "config.json").write_text(json.dumps({"pretrained_config": {"dtype": "float16", "mapping": mapping}}))
    built.manifest.write_text(json.dumps(built.manifest_data()))
    repo = render_repository(bundle_dir, tmp_path / "repo", "gpu-trtllm", engines_dir=engines)
    assert gpt_model_path(repo) == str(built.engine_dir.resolve())

    other = json.loads(built.manifest.read_text())
    other["spec"] = "another-model"
    built.manifest.write_text(json.dumps(other))
    with pytest.raises(RenderError, match="records a build of spec 'another-model', not 'tiny-mm'"):
        render_repository(bundle_dir, tmp_path / "repo2", "gpu-trtllm", engines_dir=engines)
