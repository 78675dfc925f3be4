"""What makes the saved tokenizer and LLM config load in transformers 4.57 (the TensorRT-LLM image's) as in 5.x.

The bundle's tokenizer and config must load in the TensorRT-LLM image too, whose
transformers is 4.57.1 (TensorRT-LLM requirements.txt, 1.2-era index copy 000867d9), not
the 5.x that saves them here. transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``
(no such class in 4.x) and the special tokens as ``extra_special_tokens``; 4.57 loads the
same tokenizer.json as ``PreTrainedTokenizerFast`` with ``additional_special_tokens``, and 5.x
still reads both. tests/test_tokenizer_compat.py checks it in a transformers 4.57.1 venv.

The helpers are the bundle modules' own (the tokenizer, the LLM weights and the manifest
each use one), hence the leading underscores.
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _make_tokenizer_portable(llm_dir: Path) -> None:
    """Rewrite ``tokenizer_config.json`` so transformers 4.57 and 5.x both load it.

    See :data:`PORTABLE_TOKENIZER_CLASS`.
    """
    path = llm_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.57 reads extra_special_tokens as a name -> token mapping; the list form is 5.x only.
        del config["extra_special_tokens"]
        known = config.get("additional_special_tokens", [])
        config["additional_special_tokens"] = list(dict.fromkeys([*known, *extra]))
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _make_config_portable(llm_dir: Path) -> None:
    """Write ``rope_theta`` at the top level of ``config.json`` too.

    transformers 5 keeps it only in ``rope_parameters``; 4.57's Llama config reads the
    top-level ``rope_theta`` and would otherwise fall back to its default of 10000.
    """
    path = llm_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_portable(llm_dir: Path) -> bool:
    """True when the tokenizer config (and a config.json written here) already load in transformers 4.57."""
    try:
        tokenizer = json.loads((llm_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if tokenizer.get("tokenizer_class") == "TokenizersBackend":
        return False
    if isinstance(tokenizer.get("extra_special_tokens"), list):
        return False
    config_path = llm_dir / "config.json"
    if config_path.is_symlink():
        return True  # a linked checkpoint's own config is left as it is
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return not (isinstance(config.get("rope_parameters"), dict) and "rope_theta" not in config)

