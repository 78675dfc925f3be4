"""Tests for the tiny bundle builder: reproducibility, encoder parity, tokenizer and LLM."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from build_engines.bundle import build_bundle
from build_engines.bundle_encoders import relative_error
from build_engines.bundle_manifest import BundleError, load_bundle
from mmtriton.encoders.modules import AudioEncoder, VisionEncoder
from mmtriton.encoders.onnx_runtime import OnnxEncoder
from mmtriton.spec import ModelSpec, load_spec

REPO = Path(__file__).parents[1]
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return load_spec(REPO / "build_engines" / "specs" / "tiny.toml")


@pytest.fixture(scope="session")
def bundle_dir(spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(spec, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def manifest(bundle_dir: Path) -> dict:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="session")
def tokenizer(bundle_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(bundle_dir / "llm")


def _vision_model(spec: ModelSpec, bundle_dir: Path, llm_hidden: int) -> VisionEncoder:
    model = VisionEncoder(spec.vision, llm_hidden)
    model.load_state_dict(load_file(bundle_dir / "vision_encoder" / "model.safetensors"))
    return model.eval()


def _audio_model(spec: ModelSpec, bundle_dir: Path, llm_hidden: int) -> AudioEncoder:
    model = AudioEncoder(spec.audio, llm_hidden)
    model.load_state_dict(load_file(bundle_dir / "audio_encoder" / "model.safetensors"))
    return model.eval()


def test_manifest_lists_every_file(bundle_dir: Path, manifest: dict, spec: ModelSpec) -> None:
    on_disk = {
        p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file() and p.name != "bundle.json"
    }
    assert set(manifest["files"]) == on_disk
    assert {"llm/model.safetensors", "vision_encoder/model.onnx", "audio_encoder/model.onnx"} <= on_disk
    assert manifest["format"] == 1
    assert manifest["llm_hidden_size"] == spec.llm.hidden_size
    assert manifest["dir"] == str(bundle_dir)


def test_build_is_reproducible(spec: ModelSpec, manifest: dict, tmp_path: Path) -> None:
    again = load_bundle(build_bundle(spec, tmp_path / "again"))
    assert again["files"] == manifest["files"]
    assert again["token_ids"] == manifest["token_ids"]


def test_rebuild_is_skipped_for_same_spec(spec: ModelSpec, tmp_path: Path) -> None:
    out = build_bundle(spec, tmp_path / "b")
    onnx_path = out / "vision_encoder" / "model.onnx"
    before = onnx_path.stat().st_mtime_ns
    build_bundle(spec, out)
    assert onnx_path.stat().st_mtime_ns == before
    # force=True writes the file again: a marker put in its place is gone and the content is the build's.
    original = onnx_path.read_bytes()
    onnx_path.write_bytes(b"not the exported model")
    os.utime(onnx_path, ns=(0, 0))
    build_bundle(spec, out, force=True)
    assert onnx_path.read_bytes() == original
    assert onnx_path.stat().st_mtime_ns > 0


def test_load_bundle_missing(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle.json"):
        load_bundle(tmp_path)


def test_vision_onnx_matches_pytorch(spec: ModelSpec, bundle_dir: Path, manifest: dict) -> None:
    model = _vision_model(spec, bundle_dir, manifest["llm_hidden_size"])
    size = spec.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2.0
    with torch.no_grad():
        want = model(pixels).numpy()
    got = OnnxEncoder(bundle_dir / "vision_encoder" / "model.onnx", intra_op_threads=1).run(pixel_values=pixels.numpy())
    assert got["embeddings"].shape == (3, spec.vision.tokens_per_image, manifest["llm_hidden_size"])
    assert relative_error(got["embeddings"], want) < 1e-3


def test_audio_onnx_matches_pytorch(spec: ModelSpec, bundle_dir: Path, manifest: dict) -> None:
    model = _audio_model(spec, bundle_dir, manifest["llm_hidden_size"])
    features = torch.randn(3, 123, spec.audio.n_mfcc, generator=torch.Generator().manual_seed(8))
    lengths = torch.tensor([123, 64, 5])
    with torch.no_grad():
        want, want_lengths = model(features, lengths)
    got = OnnxEncoder(bundle_dir / "audio_encoder" / "model.onnx").run(
        features=features.numpy(), lengths=lengths.numpy()
    )
    assert got["embeddings"].shape == (3, spec.audio.tokens(123), manifest["llm_hidden_size"])
    assert got["out_lengths"].dtype == np.int64
    np.testing.assert_array_equal(got["out_lengths"], [spec.audio.tokens(n) for n in (123, 64, 5)])
    np.testing.assert_array_equal(got["out_lengths"], want_lengths.numpy())
    assert relative_error(got["embeddings"], want.numpy()) < 1e-3


def test_audio_padding_invariance(spec: ModelSpec, bundle_dir: Path, manifest: dict) -> None:
    model = _audio_model(spec, bundle_dir, manifest["llm_hidden_size"])
    session = OnnxEncoder(bundle_dir / "audio_encoder" / "model.onnx")
    gen = torch.Generator().manual_seed(9)
    frames = 101
    batch = torch.randn(4, frames, spec.audio.n_mfcc, generator=gen) * 3.0
    lengths = torch.tensor([frames, 57, 30, 1])
    with torch.no_grad():
        batched, batched_lengths = model(batch, lengths)
    onnx_batched = session.run(features=batch.numpy(), lengths=lengths.numpy())
    for row, length in enumerate(lengths.tolist()):
        alone_input = batch[row : row + 1, :length]
        with torch.no_grad():
            alone, alone_lengths = model(alone_input, torch.tensor([length]))
        n = spec.audio.tokens(length)
        assert alone.shape[1] == n == int(alone_lengths[0]) == int(batched_lengths[row])
        assert relative_error(batched[row, :n].numpy(), alone[0].numpy()) < 1e-5
        assert torch.all(batched[row, n:] == 0)
        onnx_alone = session.run(features=alone_input.numpy(), lengths=np.array([length]))
        assert relative_error(onnx_batched["embeddings"][row, :n], onnx_alone["embeddings"][0]) < 1e-5


def test_tokenizer(spec: ModelSpec, manifest: dict, tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == manifest["vocab_size"] == spec.tokenizer.vocab_size
    text = "Un café naïve à Zürich — 日本語 and 😀🚀 cost €12!\nNew line,  two spaces."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # Some learned merge covers a whole multi-byte character (e.g. "é"); a lone
    # byte of one decodes to U+FFFD instead.
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any(not p.isascii() and "\ufffd" not in p for p in pieces)

    for token in [*SPECIAL_TOKENS, spec.tokenizer.image_token, spec.tokenizer.audio_token]:
        token_ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(token_ids) == 1 and token_ids[0] != tokenizer.unk_token_id, token
    ids = manifest["token_ids"]
    assert tokenizer.bos_token_id == ids["bos"]
    assert tokenizer.eos_token_id == ids["eos"]
    assert tokenizer.pad_token_id == ids["pad"]
    assert tokenizer.convert_tokens_to_ids(spec.tokenizer.image_token) == ids["image"]
    assert tokenizer.convert_tokens_to_ids(spec.tokenizer.audio_token) == ids["audio"]

    messages = [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": "What is in <image>?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|begin_of_text|><|system|>You describe pictures.<|end|><|user|>What is in <image>?<|end|><|assistant|>"
    )
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encoded.count(ids["image"]) == 1
    assert encoded[0] == ids["bos"]
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>")

    parts = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": " transcribe"}]}]
    assert tokenizer.apply_chat_template(parts, add_generation_prompt=True, tokenize=False) == (
        "<|begin_of_text|><|user|><audio> transcribe<|end|><|assistant|>"
    )


def test_llm_loads(bundle_dir: Path, manifest: dict, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(bundle_dir / "llm").eval()
    assert model.config.vocab_size == len(tokenizer) == manifest["vocab_size"]
    assert model.config.hidden_size == manifest["llm_hidden_size"]
    assert model.config.eos_token_id == manifest["token_ids"]["eos"]
    assert not model.config.tie_word_embeddings
    input_ids = torch.tensor([tokenizer.encode("hello café", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_existing_artifacts_are_linked(spec: ModelSpec, bundle_dir: Path, manifest: dict, tmp_path: Path) -> None:
    linked = dataclasses.replace(
        spec,
        llm=dataclasses.replace(spec.llm, checkpoint=str(bundle_dir / "llm")),
        tokenizer=dataclasses.replace(spec.tokenizer, path=str(bundle_dir / "llm")),
        vision=dataclasses.replace(spec.vision, onnx=str(bundle_dir / "vision_encoder" / "model.onnx")),
        audio=dataclasses.replace(spec.audio, onnx=str(bundle_dir / "audio_encoder" / "model.onnx")),
    )
    out = load_bundle(build_bundle(linked, tmp_path / "linked"))
    for rel in ("llm/model.safetensors", "llm/config.json", "vision_encoder/model.onnx", "audio_encoder/model.onnx"):
        assert out["files"][rel] == manifest["files"][rel], rel
    assert (tmp_path / "linked" / "llm" / "model.safetensors").is_symlink()
    assert out["vocab_size"] == manifest["vocab_size"]
    assert {k: out["token_ids"][k] for k in ("bos", "eos", "pad", "image", "audio")} == {
        k: manifest["token_ids"][k] for k in ("bos", "eos", "pad", "image", "audio")
    }


def test_mismatched_onnx_is_rejected(spec: ModelSpec, bundle_dir: Path, tmp_path: Path) -> None:
    audio_onnx = str(bundle_dir / "audio_encoder" / "model.onnx")
    wrong = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, onnx=audio_onnx))
    with pytest.raises(BundleError, match="expected"):
        build_bundle(wrong, tmp_path / "wrong")


@pytest.mark.parametrize("spec_path", sorted((REPO / "build_engines" / "specs").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_specs_name_only_files_that_exist(spec_path: Path) -> None:
    """A spec's comments point readers at other files of the repository: each must be there."""
    comments = "\n".join(line.partition("#")[2] for line in spec_path.read_text().splitlines() if "#" in line)
    named = re.findall(r"\b((?:build_engines|docs|mmtriton|model_repository|tools|tests)/[\w./-]*\w|README\.md)", comments)
    missing = [name for name in named if not (REPO / name).exists()]
    assert missing == [], f"{spec_path.name} names files that do not exist: {missing}"
