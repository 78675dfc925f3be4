"""A random-weight Qwen2.5-Omni checkpoint in the layout of the downloaded one (no model hub here).

``Qwen/Qwen2.5-Omni-7B`` cannot be downloaded on this machine, so the tests and the GPU
measurements use a checkpoint written here from the real configuration values
(``shared/reference/qwen2.5-omni-facts.md`` §2, with their transformers sources), with
random weights, in the files a download has: ``config.json`` (the full Omni config, the
thinker inside, audio output off), ``model.safetensors``, ``spk_dict.pt`` (which
``from_pretrained`` of the full class requires), a tokenizer whose special tokens sit at
the real ids 151643-151656, ``preprocessor_config.json`` (Qwen2-VL image processor with
the checkpoint's pixel bounds, Whisper features with 128 mel bins and 300 s chunks) and a
chat template (``chat_template.jinja``, and in the tokenizer) that renders as §5 describes. A user's real download goes through the same
code paths.

``tiny`` keeps the architecture and every token id but shrinks the widths and depths (CPU
tests, seconds); ``7b`` is the real shape (18 GB of weights: build it where it is served).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mmtriton.media.qwen2_5_omni.audio import HOP, MAX_SECONDS, N_FFT, N_MELS, SAMPLE_RATE
from mmtriton.media.qwen2_5_omni.image import MERGE, PATCH, TEMPORAL, ImageSettings

LOGGER = logging.getLogger(__name__)

#: Special tokens of the checkpoint's ``added_tokens.json``, in id order from FIRST_SPECIAL_ID.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
)  # fmt: skip
FIRST_SPECIAL_ID = 151643
#: The processor's named tokens (``Qwen2_5OmniProcessor`` reads them from the tokenizer, with no fallback).
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}

#: Thinker sizes: the real 7B ones and a tiny one of the same architecture (head_dim/2 = sum of mrope_section).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "7b": {
        "text": {
            "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False,
        },
        "vision": {
            "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "depth": 32, "patch_size": 14,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "out_hidden_size": 3584,
        },
        "audio": {
            "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
            "d_model": 1280, "max_source_positions": 1500, "n_window": 100, "output_dim": 3584,
        },
    },
    "tiny": {
        "text": {
            "vocab_size": 152064, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": False,
        },
        "vision": {
            "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "depth": 2, "patch_size": 14,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
            "out_hidden_size": 64,
        },
        "audio": {
            "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "d_model": 32, "max_source_positions": 1500, "n_window": 100, "output_dim": 64,
        },
    },
}  # fmt: skip

#: The chat template: a default system turn when none is given, ``<|im_start|>role\n...<|im_end|>\n``
#: turns, an image part as ``<|vision_bos|><|IMAGE|><|vision_eos|>``, an audio part as
#: ``<|audio_bos|><|AUDIO|><|audio_eos|>``, and ``<|im_start|>assistant\n`` as the generation prompt.
CHAT_TEMPLATE = (
    r"{%- if not messages or messages[0]['role'] != 'system' %}"
    r"{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    r"{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    r"{%- if message['content'] is string %}{{- message['content'] }}"
    r"{%- else %}{%- for part in message['content'] %}"
    r"{%- if part['type'] == 'image' %}{{- '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    r"{%- elif part['type'] == 'audio' %}{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    r"{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    r"{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def omni_config(size: str) -> Any:
    """The full ``Qwen2_5OmniConfig`` (thinker only, audio output off) of ``size`` (``tiny`` or ``7b``)."""
    from transformers import Qwen2_5OmniConfig

    parts = SIZES[size]
    thinker = {
        "text_config": dict(parts["text"]),
        "vision_config": dict(parts["vision"]),
        "audio_config": dict(parts["audio"]),
        # The HF thinker reads these, its config does not declare them.
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    }
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config


def omni_tokenizer() -> Any:
    """A byte-level BPE tokenizer with the checkpoint's special tokens at their real ids.

    256 byte symbols, then filler tokens up to id 151642, then the special tokens in id
    order: random weights make the text meaningless anyway; what must hold is every id the
    model, the processor and vLLM look up.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return Qwen2Tokenizer(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_TOKENS),
    )


def preprocessor_settings() -> dict[str, Any]:
    """``preprocessor_config.json``: the Qwen2-VL image processor's and the Whisper feature extractor's settings.

    Both processors read their own keys from the one file. (``Qwen2_5OmniProcessor`` itself
    is not built here: in transformers 5.24 it needs a video processor, which needs
    torchvision, which this machine's CPU wheel set does not have.)
    """
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

    # The constants the DALI pipelines follow are the ones written here: one definition each.
    image_settings = ImageSettings()
    image = Qwen2VLImageProcessor(
        min_pixels=image_settings.min_pixels, max_pixels=image_settings.max_pixels, patch_size=PATCH,
        temporal_patch_size=TEMPORAL, merge_size=MERGE, image_mean=list(image_settings.mean),
        image_std=list(image_settings.std),
    )  # fmt: skip
    audio = WhisperFeatureExtractor(
        feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP, n_fft=N_FFT, chunk_length=int(MAX_SECONDS)
    )
    settings = {**audio.to_dict(), **image.to_dict()}
    # Arrays and computed state are rebuilt on load, not read.
    settings.pop("mel_filters", None)
    settings.update(processor_class="Qwen2_5OmniProcessor", image_processor_type="Qwen2VLImageProcessor",
                    feature_extractor_type="WhisperFeatureExtractor")  # fmt: skip
    return settings


def build_checkpoint(out: Path, size: str = "tiny", seed: int = 0, weights: bool = True) -> Path:
    """Write a Qwen2.5-Omni checkpoint folder with random weights.

    Args:
        out: The folder to write (created; must not hold a checkpoint already).
        size: ``tiny`` (CPU tests) or ``7b`` (the real shape).
        seed: Seed of the random weights.
        weights: False writes everything but the weights (to check a configuration).

    Returns:
        ``out``.
    """
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json)")
    out.mkdir(parents=True, exist_ok=True)
    config = omni_config(size)
    if weights:
        torch.manual_seed(seed)
        model = Qwen2_5OmniForConditionalGeneration(config).to(torch.bfloat16 if size == "7b" else torch.float32).eval()
        model.save_pretrained(out, safe_serialization=True)
        LOGGER.info("wrote %s weights (%d parameters) to %s", size, sum(p.numel() for p in model.parameters()), out)
    else:
        config.save_pretrained(out)
    # from_pretrained of the full class loads the talker's speakers from here; the thinker needs none.
    torch.save({}, out / "spk_dict.pt")
    tokenizer = omni_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_settings(), indent=2, sort_keys=True) + "\n")
    (out / "mmtriton-checkpoint.json").write_text(json.dumps({"family": "qwen2.5-omni", "size": size, "seed": seed}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m build_engines.checkpoints.qwen2_5_omni --size tiny --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight Qwen2.5-Omni checkpoint in the layout of the download.")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (CPU tests) or 7b (the real shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-weights", action="store_true", help="write the configuration, tokenizer and processor files only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_checkpoint(args.out, args.size, args.seed, weights=not args.no_weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
