"""Build a model bundle (tokenizer, LLM checkpoint, ONNX encoders) from a model spec.

Layout of ``out_dir``::

    bundle.json                  spec, vocab size, special token ids, sha256 of every file
    llm/                         Hugging Face tokenizer + LlamaForCausalLM checkpoint
    vision_encoder/model.onnx    pixel_values [batch,3,S,S] -> embeddings [batch,N,llm_hidden]
    vision_encoder/model.safetensors
    audio_encoder/model.onnx     features [batch,frames,n_mfcc], lengths [batch]
                                 -> embeddings [batch,tokens,llm_hidden], out_lengths [batch]
    audio_encoder/model.safetensors

Parts the spec leaves empty (``checkpoint``, ``path``, ``onnx``) are generated from
``spec.seed`` with no download, byte-for-byte reproducibly; parts it names are
linked or copied in. ``bundle.json`` is written last, so a bundle with one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mmtriton.spec import ModelSpec
from mmtriton.encoders.modules import AudioEncoder, VisionEncoder
from mmtriton.encoders.onnx_runtime import OnnxEncoder

__all__ = ["BUNDLE_FORMAT", "BundleError", "build_bundle", "chat_template", "load_bundle", "relative_error"]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
#: The bundle's tokenizer and config must load in the TensorRT-LLM image too, whose
#: transformers is 4.57.1 (TensorRT-LLM requirements.txt, 1.2-era index copy 000867d9), not
#: the 5.x that saves them here. transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``
#: (no such class in 4.x) and the special tokens as ``extra_special_tokens``; 4.57 loads the
#: same tokenizer.json as ``PreTrainedTokenizerFast`` with ``additional_special_tokens``, and 5.x
#: still reads both. tests/test_tokenizer_compat.py checks it in a transformers 4.57.1 venv.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
ONNX_OPSET = 17
PARITY_RTOL = 1e-3

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"

# String content, or OpenAI-style content parts where image / audio parts become
# the placeholder token that the serving side expands into encoder embeddings.
CHAT_TEMPLATE_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '__SYSTEM__' }}"
    "{%- elif message['role'] == 'user' %}{{ '__USER__' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '__ASSISTANT__' }}"
    "{%- else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{ '__IMAGE__' }}"
    "{%- elif part['type'] in ['audio', 'input_audio'] %}{{ '__AUDIO__' }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{ '__END__' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '__ASSISTANT__' }}{%- endif %}"
)

_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    }
)


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, or failed a build-time check."""


def chat_template(image_token: str, audio_token: str) -> str:
    """The Jinja chat template of the locally trained tokenizer.

    Args:
        image_token: Placeholder emitted for image content parts.
        audio_token: Placeholder emitted for audio content parts.

    Returns:
        Template text for ``tokenizer.chat_template``.
    """
    replacements = {
        "__SYSTEM__": SYSTEM,
        "__USER__": USER,
        "__ASSISTANT__": ASSISTANT,
        "__END__": END,
        "__IMAGE__": image_token,
        "__AUDIO__": audio_token,
    }
    text = CHAT_TEMPLATE_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def build_bundle(spec: ModelSpec, out_dir: Path, *, force: bool = False, device: str = "cpu") -> Path:
    """Build every artifact the server needs for ``spec`` into ``out_dir``.

    Args:
        spec: The model spec.
        out_dir: Bundle directory; created if missing. Only ``bundle.json``,
            ``llm/``, ``vision_encoder/`` and ``audio_encoder/`` inside it are replaced.
        force: Rebuild even if ``out_dir`` already holds a bundle of the same spec.
        device: Where random LLM weights are initialised (``cuda`` makes a 9B-shaped
            model in seconds; the values then differ from a CPU build of the same seed).

    Returns:
        ``out_dir``.

    Raises:
        BundleError: An exported encoder disagrees with PyTorch, or a referenced
            checkpoint / tokenizer / ONNX file is unusable.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "bundle.json"
    spec_data = _plain(spec.to_dict())
    if not force and _is_current(out_dir, spec_data):
        logger.info("bundle %s already built for spec %r; skipping (force=True rebuilds)", out_dir, spec.name)
        return out_dir

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for name in ("llm", "vision_encoder", "audio_encoder"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    llm_dir = out_dir / "llm"
    llm_dir.mkdir()

    with _step("tokenizer"):
        tokenizer = _build_tokenizer(spec, llm_dir)
    token_ids = _token_ids(spec, tokenizer)
    with _step("llm"):
        llm_hidden, llm_vocab = _build_llm(spec, llm_dir, len(tokenizer), token_ids, device)
    with _step("vision encoder"):
        _build_vision(spec, out_dir / "vision_encoder", llm_hidden)
    with _step("audio encoder"):
        _build_audio(spec, out_dir / "audio_encoder", llm_hidden)

    manifest = {
        "format": BUNDLE_FORMAT,
        "spec": spec_data,
        # The LLM's embedding rows: fake prompt-table ids start here (may exceed the tokenizer's size).
        "vocab_size": llm_vocab,
        "llm_hidden_size": llm_hidden,
        "token_ids": token_ids,
        "files": _hash_files(out_dir),
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    logger.info("bundle %s built in %.2fs (%d files)", out_dir, time.perf_counter() - start, len(manifest["files"]))
    return out_dir


def load_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Read a bundle's ``bundle.json``.

    Args:
        bundle_dir: Directory given to :func:`build_bundle`.

    Returns:
        The manifest, with ``"dir"`` set to ``bundle_dir`` as a string.

    Raises:
        BundleError: There is no readable ``bundle.json`` of a supported format.
    """
    path = Path(bundle_dir) / "bundle.json"
    if not path.is_file():
        raise BundleError(f"no bundle at {bundle_dir}: {path} is missing; build it with build_engines first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {data.get('format')!r}, expected {BUNDLE_FORMAT}; rebuild it")
    data["dir"] = str(bundle_dir)
    return data


@contextmanager
def _step(name: str) -> Iterator[None]:
    logger.info("building %s", name)
    start = time.perf_counter()
    yield
    logger.info("built %s in %.2fs", name, time.perf_counter() - start)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(data))


def _is_current(out_dir: Path, spec_data: dict[str, Any]) -> bool:
    try:
        manifest = load_bundle(out_dir)
    except BundleError:
        return False
    if manifest.get("spec") != spec_data:
        return False
    if not all((out_dir / rel).is_file() for rel in manifest.get("files", {})):
        return False
    # Bundles written before the transformers-4.57 compatibility fix are rebuilt.
    return _is_portable(out_dir / "llm")


# Files above this size (multi-GB weights of a 9B-shaped bundle) are recorded by size, not hashed.
HASH_LIMIT_BYTES = 1 << 30


def _hash_files(out_dir: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for name in ("llm", "vision_encoder", "audio_encoder"):
        for path in sorted((out_dir / name).rglob("*")):
            if path.is_file() and path.stat().st_size > HASH_LIMIT_BYTES:
                hashes[path.relative_to(out_dir).as_posix()] = f"size:{path.stat().st_size}"
            elif path.is_file():
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                hashes[path.relative_to(out_dir).as_posix()] = digest.hexdigest()
    return dict(sorted(hashes.items()))


# --------------------------------------------------------------------------- tokenizer


def _corpus(seed: int, sentences: int = 400) -> list[str]:
    """A deterministic English corpus with some multi-byte UTF-8 words and emoji."""
    rng = random.Random(seed)
    subjects = [
        "The cat", "A small dog", "My neighbour", "The old farmer", "Our teacher", "The robot",
        "A young student", "The pilot", "Her brother", "The chef", "Every child", "The doctor",
        "A curious fox", "The musician", "Their grandmother", "The engineer", "A tired traveller",
    ]
    verbs = [
        "watched", "painted", "carried", "found", "described", "remembered", "photographed",
        "listened to", "cooked", "repaired", "discovered", "ordered", "counted", "followed",
        "explained", "visited", "measured", "translated", "recorded", "imagined",
    ]
    adjectives = [
        "red", "quiet", "enormous", "bright", "wooden", "broken", "beautiful", "strange",
        "little", "ancient", "noisy", "golden", "purple", "delicious", "careful", "naïve",
        "frozen", "gentle", "heavy", "shiny",
    ]
    objects = [
        "apple", "river", "mountain", "bicycle", "window", "garden", "picture", "song",
        "train", "letter", "bridge", "castle", "piano", "forest", "computer", "camera",
        "sandwich", "jalapeño", "café", "crème brûlée", "piñata", "résumé", "façade",
    ]
    places = [
        "in the park", "near the station", "at the market", "in Tokyo (東京)", "behind the school",
        "on the beach", "in a café in Paris", "under the bridge", "at home", "in the kitchen",
        "in Zürich", "in São Paulo", "in 日本", "by the lake", "on the roof",
    ]
    times = [
        "yesterday", "this morning", "last week", "every Sunday", "at noon", "in 1999",
        "on 12 March", "after dinner", "before sunrise", "twice a day",
    ]
    extras = [
        "It was great 😀.", "Nobody expected that! 🚀", "The price was €12.50.", "She said 日本語 is fun.",
        "Wow — what a day.", "That's über cool 🎉.", "He smiled 👍.", "We wrote 中文 and 한국어 too.",
        "The temperature was 21°C.", "Is it naïve to hope? Maybe.", "Thanks a lot! ❤️",
    ]
    lines = []
    for _ in range(sentences):
        sentence = (
            f"{rng.choice(subjects)} {rng.choice(verbs)} the {rng.choice(adjectives)} "
            f"{rng.choice(objects)} {rng.choice(places)} {rng.choice(times)}."
        )
        if rng.random() < 0.3:
            sentence += " " + rng.choice(extras)
        if rng.random() < 0.2:
            sentence += f" It cost {rng.randint(1, 999)} dollars and took {rng.randint(2, 59)} minutes."
        lines.append(sentence)
    lines.extend(extras)
    return lines


def _train_tokenizer(spec: ModelSpec) -> Tokenizer:
    specials = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END, spec.tokenizer.image_token, spec.tokenizer.audio_token]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer.vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    return tokenizer


def _build_tokenizer(spec: ModelSpec, llm_dir: Path) -> PreTrainedTokenizerFast:
    tspec = spec.tokenizer
    if tspec.path:
        tokenizer = AutoTokenizer.from_pretrained(tspec.path)
        missing = [t for t in (tspec.image_token, tspec.audio_token) if t not in tokenizer.get_vocab()]
        if missing:
            logger.warning("tokenizer %s lacks %s; adding them as special tokens", tspec.path, missing)
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [*tokenizer.extra_special_tokens, *missing]}
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        trained = _train_tokenizer(spec)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=trained,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            extra_special_tokens=[SYSTEM, USER, ASSISTANT, END, tspec.image_token, tspec.audio_token],
            chat_template=chat_template(tspec.image_token, tspec.audio_token),
            clean_up_tokenization_spaces=False,
            model_max_length=spec.llm.max_position_embeddings,
        )
        if len(tokenizer) != tspec.vocab_size:
            logger.warning("trained tokenizer has %d tokens, spec asks for %d", len(tokenizer), tspec.vocab_size)
    tokenizer.save_pretrained(llm_dir)
    _make_tokenizer_portable(llm_dir)
    return tokenizer


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


def _token_ids(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "image": tokenizer.convert_tokens_to_ids(spec.tokenizer.image_token),
        "audio": tokenizer.convert_tokens_to_ids(spec.tokenizer.audio_token),
    }
    if not spec.tokenizer.path:
        ids["end"] = tokenizer.convert_tokens_to_ids(END)
    unset = sorted(k for k, v in ids.items() if v is None or (k != "bos" and v == tokenizer.unk_token_id))
    if unset:
        raise BundleError(f"tokenizer has no id for {unset}")
    return ids


# --------------------------------------------------------------------------- llm


def _build_llm(
    spec: ModelSpec, llm_dir: Path, tokenizer_size: int, token_ids: dict[str, int], device: str = "cpu"
) -> tuple[int, int]:
    """Write the LLM checkpoint into ``llm_dir``; return its hidden size and vocabulary size."""
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
        if not path.is_file() or rel.parts[0].startswith(".") or rel.name in _TOKENIZER_FILES:
            continue
        target = llm_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return hidden, vocab if isinstance(vocab, int) else vocab_size


# --------------------------------------------------------------------------- encoders


def _copy_onnx(source: Path, out_dir: Path, inputs: list[str], outputs: list[str]) -> None:
    """Copy an ONNX encoder (and its external data files) after checking its I/O names."""
    if not source.is_file():
        raise BundleError(f"encoder ONNX file {source} does not exist")
    model = onnx.load(str(source), load_external_data=False)
    got_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    got_outputs = [o.name for o in model.graph.output]
    if got_inputs != inputs or got_outputs != outputs:
        raise BundleError(f"{source}: inputs {got_inputs} / outputs {got_outputs}, expected {inputs} / {outputs}")
    out_dir.mkdir(parents=True)
    shutil.copyfile(source, out_dir / "model.onnx")
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        shutil.copyfile(source.parent / location, out_dir / location)


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo and warns
        # about traced shape arithmetic; both are expected here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _pin_output_dim(path: Path, output: str, axis: int, size: int) -> None:
    model = onnx.load(str(path))
    (value,) = [o for o in model.graph.output if o.name == output]
    value.type.tensor_type.shape.dim[axis].dim_value = size
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _check_parity(name: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    for key, want in expected.items():
        have = got[key]
        if have.shape != want.shape:
            raise BundleError(f"{name} ONNX output {key!r} has shape {have.shape}, PyTorch {want.shape}")
        if np.issubdtype(want.dtype, np.integer):
            if not np.array_equal(have, want):
                raise BundleError(f"{name} ONNX output {key!r} differs from PyTorch: {have} vs {want}")
            continue
        error = relative_error(have, want)
        if error > PARITY_RTOL:
            raise BundleError(f"{name} ONNX output {key!r} relative error {error:.2e} exceeds {PARITY_RTOL:.0e}")
        logger.info("%s ONNX parity %r: relative error %.2e", name, key, error)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (0 when both are all zero)."""
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
    return diff / scale if scale else diff


def _build_vision(spec: ModelSpec, out_dir: Path, llm_hidden: int) -> None:
    inputs, outputs = ["pixel_values"], ["embeddings"]
    if spec.vision.onnx:
        _copy_onnx(Path(spec.vision.onnx), out_dir, inputs, outputs)
        return
    out_dir.mkdir(parents=True)
    size = spec.vision.image_size
    model = VisionEncoder(spec.vision, llm_hidden, generator=torch.Generator().manual_seed(spec.seed + 1)).eval()
    _save_weights(model, out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(spec.seed + 11)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    dynamic_axes = {"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}}
    _export(model, (pixels,), out_dir / "model.onnx", inputs, outputs, dynamic_axes)
    # The exporter names the token axis symbolically because the attention
    # reshapes read it from the input shape; it is fixed, so pin it.
    _pin_output_dim(out_dir / "model.onnx", "embeddings", 1, spec.vision.tokens_per_image)
    with torch.no_grad():
        want = model(pixels).numpy()
    got = OnnxEncoder(out_dir / "model.onnx").run(pixel_values=pixels.numpy())
    _check_parity("vision", {"embeddings": want}, got)


def _build_audio(spec: ModelSpec, out_dir: Path, llm_hidden: int) -> None:
    inputs, outputs = ["features", "lengths"], ["embeddings", "out_lengths"]
    if spec.audio.onnx:
        _copy_onnx(Path(spec.audio.onnx), out_dir, inputs, outputs)
        return
    out_dir.mkdir(parents=True)
    model = AudioEncoder(spec.audio, llm_hidden, generator=torch.Generator().manual_seed(spec.seed + 2)).eval()
    _save_weights(model, out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(spec.seed + 12)
    features = torch.randn(3, 50, spec.audio.n_mfcc, generator=gen)
    lengths = torch.tensor([50, 31, 7], dtype=torch.int64)
    _export(
        model,
        (features, lengths),
        out_dir / "model.onnx",
        inputs,
        outputs,
        {
            "features": {0: "batch", 1: "frames"},
            "lengths": {0: "batch"},
            "embeddings": {0: "batch", 1: "tokens"},
            "out_lengths": {0: "batch"},
        },
    )
    # Check on a shape other than the traced one, so a shape baked in at export shows up.
    check_features = torch.randn(4, 77, spec.audio.n_mfcc, generator=gen)
    check_lengths = torch.tensor([77, 60, 13, 1], dtype=torch.int64)
    with torch.no_grad():
        embeddings, out_lengths = model(check_features, check_lengths)
    got = OnnxEncoder(out_dir / "model.onnx").run(features=check_features.numpy(), lengths=check_lengths.numpy())
    _check_parity("audio", {"embeddings": embeddings.numpy(), "out_lengths": out_lengths.numpy()}, got)
