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

The parts: :mod:`build_engines.bundle_tokenizer` (tokenizer and chat template),
:mod:`build_engines.bundle_llm` (LLM weights), :mod:`build_engines.bundle_encoders`
(encoder export and parity), :mod:`build_engines.bundle_compat` (transformers 4.57
loading), :mod:`build_engines.bundle_manifest` (``bundle.json``: reading, hashing, up to date).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from build_engines.bundle_encoders import build_audio, build_vision
from build_engines.bundle_llm import build_llm
from build_engines.bundle_manifest import BUNDLE_FORMAT, PARTS, bundle_is_current, hash_files, spec_data
from build_engines.bundle_tokenizer import build_tokenizer, token_ids
from mmtriton.spec import ModelSpec

logger = logging.getLogger(__name__)


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
    if not force and bundle_is_current(out_dir, spec):
        return out_dir

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for name in PARTS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    llm_dir = out_dir / "llm"
    llm_dir.mkdir()

    with _step("tokenizer"):
        tokenizer = build_tokenizer(spec, llm_dir)
    ids = token_ids(spec, tokenizer)
    with _step("llm"):
        llm_hidden, llm_vocab = build_llm(spec, llm_dir, len(tokenizer), ids, device)
    with _step("vision encoder"):
        build_vision(spec, out_dir / "vision_encoder", llm_hidden)
    with _step("audio encoder"):
        build_audio(spec, out_dir / "audio_encoder", llm_hidden)

    manifest = {
        "format": BUNDLE_FORMAT,
        "spec": spec_data(spec),
        # The LLM's embedding rows: fake prompt-table ids start here (may exceed the tokenizer's size).
        "vocab_size": llm_vocab,
        "llm_hidden_size": llm_hidden,
        "token_ids": ids,
        "files": hash_files(out_dir),
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    logger.info("bundle %s built in %.2fs (%d files)", out_dir, time.perf_counter() - start, len(manifest["files"]))
    return out_dir


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Log the start and the duration of one part of the build."""
    logger.info("building %s", name)
    start = time.perf_counter()
    yield
    logger.info("built %s in %.2fs", name, time.perf_counter() - start)

