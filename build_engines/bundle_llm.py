"""The bundle's LLM weights: a random-weight Llama checkpoint of the spec's shape, or a local checkpoint linked in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from build_engines.bundle_compat import _make_config_portable
from build_engines.bundle_manifest import BundleError
from build_engines.bundle_tokenizer import TOKENIZER_FILES
from mmtriton.spec import ModelSpec


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Turn transformers' progress bars off while saving."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()



def build_llm(
    spec: ModelSpec, llm_dir: Path, tokenizer_size: int, token_ids: dict[str, int], device: str = "cpu"
) -> tuple[int, int]:
    """Write the LLM checkpoint into ``llm_dir``: random Llama weights of the spec's shape, or links to ``llm.checkpoint``.

    Args:
        spec: The model spec (``llm`` and ``seed``).
        llm_dir: The bundle's ``llm`` folder (the tokenizer is already saved there).
        tokenizer_size: Tokens of the tokenizer (the vocabulary may not be smaller).
        token_ids: Special token ids (:func:`build_engines.bundle_tokenizer.token_ids`).
        device: Where random weights are initialised.

    Returns:
        The LLM's hidden size and vocabulary size.

    Raises:
        BundleError: The checkpoint is unusable, or the shape or dtype cannot be built.
    """
    lspec = spec.llm
    if lspec.checkpoint:
        return _link_checkpoint(Path(lspec.checkpoint), llm_dir, tokenizer_size)
    if 0 < lspec.vocab_size < tokenizer_size:
        raise BundleError(f"llm.vocab_size {lspec.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens")
    vocab_size = lspec.vocab_size or tokenizer_size
    if lspec.family != "llama":
        raise BundleError(f"random weights are only built for family 'llama', not {lspec.family!r}")
    dtype = getattr(torch, lspec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise BundleError(f"llm.dtype {lspec.dtype!r} is not a torch dtype")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=lspec.hidden_size,
        intermediate_size=lspec.intermediate_size,
        num_hidden_layers=lspec.num_hidden_layers,
        num_attention_heads=lspec.num_attention_heads,
        num_key_value_heads=lspec.num_key_value_heads,
        max_position_embeddings=lspec.max_position_embeddings,
        bos_token_id=token_ids["bos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.device(device)]):
        torch.manual_seed(spec.seed)
        with torch.device(device):
            # Initialised in the target dtype on the target device: a 9B-shaped model in seconds on a GPU.
            model = LlamaForCausalLM._from_config(config, dtype=dtype) if device != "cpu" else LlamaForCausalLM(config)
    with _no_progress_bars():
        model.to(dtype).save_pretrained(llm_dir, safe_serialization=True)
    del model
    _make_config_portable(llm_dir)
    stop_ids = [token_ids["eos"]] + ([token_ids["end"]] if "end" in token_ids else [])
    GenerationConfig(
        bos_token_id=token_ids["bos"],
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=token_ids["pad"],
    ).save_pretrained(llm_dir)
    return lspec.hidden_size, vocab_size


def _link_checkpoint(checkpoint: Path, llm_dir: Path, vocab_size: int) -> tuple[int, int]:
    """Symlink a local checkpoint's files (not its tokenizer) into ``llm_dir``."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise BundleError(f"llm.checkpoint {checkpoint} is not a local Hugging Face checkpoint (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_config = config.get("text_config") or config
    hidden, vocab = text_config.get("hidden_size"), text_config.get("vocab_size")
    if not isinstance(hidden, int):
        raise BundleError(f"{config_path}: no integer hidden_size")
    if isinstance(vocab, int) and vocab < vocab_size:
        raise BundleError(f"{config_path}: vocab_size {vocab} is smaller than the tokenizer's {vocab_size} tokens")
    source = checkpoint.resolve()
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0].startswith(".") or rel.name in TOKENIZER_FILES:
            continue
        target = llm_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return hidden, vocab if isinstance(vocab, int) else vocab_size

