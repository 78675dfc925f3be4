"""The random-weight Qwen2.5-Omni checkpoint (build_engines.checkpoints.qwen2_5_omni) loads as a download does.

Checked against the Hugging Face classes themselves: the full model class loads it with no
missing or unexpected weights, the tokenizer has every special token at its real id, the
image processor and the Whisper feature extractor read their settings from the one
``preprocessor_config.json``, the chat template renders the turns and media parts as the
facts sheet says, and the thinker generates from an image prompt with its 3D positions.
The 7B configuration is checked value by value against the published shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engines.checkpoints.qwen2_5_omni import FIRST_SPECIAL_ID, SPECIAL_TOKENS, build_checkpoint, omni_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("omni") / "Qwen2.5-Omni-tiny", "tiny", seed=3)


def test_the_files_of_a_download(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "spk_dict.pt", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja", "generation_config.json"} <= names  # fmt: skip
    with pytest.raises(FileExistsError):
        build_checkpoint(checkpoint, "tiny")


def test_the_full_class_loads_every_weight(checkpoint: Path) -> None:
    from transformers import Qwen2_5OmniForConditionalGeneration

    from safetensors.numpy import load_file

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint)
    saved = load_file(str(checkpoint / "model.safetensors"))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # The file keeps the download's names (thinker.audio_tower.*, ...), which transformers maps to its
    # own on load; matched by shape and content, every tensor is the file's (none re-initialized).
    def fingerprint(tensors: dict) -> list:
        return sorted((tuple(t.shape), float(np.asarray(t, dtype=np.float64).sum())) for t in tensors.values())

    assert len(saved) == len(state) and fingerprint(saved) == fingerprint(state)
    assert any(k.startswith("thinker.audio_tower.") for k in saved) and any(k.startswith("thinker.visual.") for k in saved)
    assert model.config.thinker_config.text_config.vocab_size == 152064
    assert not model.config.enable_audio_output


def test_special_tokens_sit_at_the_real_ids(checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)))
    assert ids[SPECIAL_TOKENS.index("<|IMAGE|>")] == 151655 and ids[SPECIAL_TOKENS.index("<|AUDIO|>")] == 151646
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.image_token == "<|IMAGE|>" and tok.audio_token == "<|AUDIO|>" and tok.vision_bos_token == "<|vision_bos|>"
    text = "héllo, 世界"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips


def test_preprocessor_settings_load_into_both_processors(checkpoint: Path) -> None:
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

    image = Qwen2VLImageProcessor.from_pretrained(checkpoint)
    audio = WhisperFeatureExtractor.from_pretrained(checkpoint)
    assert (image.size["shortest_edge"], image.size["longest_edge"]) == (3136, 12845056)  # min / max pixels
    assert (image.patch_size, image.temporal_patch_size, image.merge_size) == (14, 2, 2)
    assert (audio.feature_size, audio.sampling_rate, audio.hop_length, audio.n_fft, audio.chunk_length) == (128, 16000, 160, 400, 300)
    # smart_resize of a 500x300 image: 308x504, 22x36 patches, 198 merged rows (facts §3).
    out = image(images=[np.zeros((300, 500, 3), dtype=np.uint8)], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 22, 36]]
    assert out["pixel_values"].shape == (22 * 36, 3 * 2 * 14 * 14)


def test_chat_template_renders_turns_and_media_parts(checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>What?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(own_system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_the_thinker_generates_from_an_image_prompt(checkpoint: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration, Qwen2VLImageProcessor

    tok = AutoTokenizer.from_pretrained(checkpoint)
    image = Qwen2VLImageProcessor.from_pretrained(checkpoint)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(checkpoint).eval()
    pixels = image(images=[np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)], return_tensors="pt")
    rows = int(pixels["image_grid_thw"].prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Say"}]}],
                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
    text = text.replace("<|IMAGE|>", "<|IMAGE|>" * rows)  # what the processor's expansion does
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert int((ids == 151655).sum()) == rows == 198
    with torch.no_grad():
        out = model.thinker.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"], max_new_tokens=4, do_sample=False,
        )  # fmt: skip
    assert out.shape[1] == ids.shape[1] + 4


def test_the_7b_configuration_is_the_published_shape() -> None:
    config = omni_config("7b").thinker_config
    text, vision, audio = config.text_config, config.vision_config, config.audio_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.num_key_value_heads) == (152064, 3584, 18944, 28, 28, 4)  # fmt: skip
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert (vision.hidden_size, vision.depth, vision.num_heads, vision.out_hidden_size, vision.fullatt_block_indexes) == (
        1280, 32, 16, 3584, [7, 15, 23, 31])  # fmt: skip
    assert (audio.num_mel_bins, audio.encoder_layers, audio.d_model, audio.output_dim) == (128, 32, 1280, 3584)
    assert (config.image_token_index, config.audio_token_index, config.audio_start_token_id) == (151655, 151646, 151647)
    tiny = omni_config("tiny").thinker_config.text_config
    assert sum(tiny.rope_parameters["mrope_section"]) == tiny.hidden_size // tiny.num_attention_heads // 2


def test_the_command_writes_a_configuration_only_checkpoint(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "Qwen2.5-Omni-7B-config"
    cmd = [sys.executable, "-m", "build_engines.checkpoints.qwen2_5_omni", "--size", "7b", "--no-weights", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]
    assert config["thinker_config"]["text_config"]["hidden_size"] == 3584
    assert json.loads((out / "mmtriton-checkpoint.json").read_text()) == {"family": "qwen2.5-omni", "size": "7b", "seed": 0}
