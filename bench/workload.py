"""The synthetic workload: run settings and deterministic requests (prompts of a target length, media)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.llm import ensemble_for

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have had not but "
    "all were when there can more one their been has if would will each about how up out them then she "
    "many some so these her him into time has look two more write go see number no way could people my "
    "than first water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our just name "
    "good sentence man think say great where help through much before line right too mean old any same "
    "tell boy follow came want show also around form three small set put end does another well large "
    "must big even such because turn here why ask went men read need land different home us move try "
    "kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under story saw"
).split()


@dataclass
class BenchSettings:
    """What one benchmark run sends.

    Attributes:
        concurrency: Concurrency levels to run, in order.
        requests: Measured requests per level (None: bounded by ``duration_s`` only).
        duration_s: Longest time a level issues new requests (None: bounded by ``requests``).
        input_tokens: Mean prompt length in tokens of the bundle's tokenizer (the user
            text; the server adds the chat template and one row per image/audio embedding).
        input_spread: Standard deviation of the prompt length.
        output_tokens: ``max_tokens`` of every request.
        image_share: Probability that a request carries an image.
        audio_share: Probability that a request carries an audio clip (independent
            of the image: some carry both).
        audio_seconds: Length of every clip (None: a mix of 2 to 4 s clips).
        warmup: Requests sent once per server before the first level, not measured.
        seed: Seed of the workload (prompts, lengths, media).
        timeout_s: Longest wait for any single response.
    """

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int | None = 32
    duration_s: float | None = None
    input_tokens: int = 96
    input_spread: float = 16.0
    output_tokens: int = 32
    image_share: float = 0.25
    audio_share: float = 0.25
    audio_seconds: float | None = None
    warmup: int = 2
    seed: int = 0
    timeout_s: float = 120.0

    def validate(self) -> None:
        """Raise ValueError if a setting is out of range."""
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests and/or --duration: a run must stop by itself")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if self.input_tokens < 1 or self.input_spread < 0 or self.output_tokens < 1:
            raise ValueError("--input-tokens and --output-tokens must be >= 1, --input-spread >= 0")
        for name in ("image_share", "audio_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1]")
        if self.audio_seconds is not None and self.audio_seconds <= 0:
            raise ValueError("--audio-seconds must be > 0")
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("--warmup must be >= 0 and --timeout > 0")

    def slug(self) -> str:
        """Short folder-name form of the settings."""
        parts = [
            "c" + "-".join(str(c) for c in self.concurrency),
            f"in{self.input_tokens}",
            f"out{self.output_tokens}",
            f"img{round(self.image_share * 100)}",
            f"aud{round(self.audio_share * 100)}",
        ]
        if self.audio_seconds is not None:
            parts.append(f"clip{self.audio_seconds:g}s")
        if self.requests is not None:
            parts.append(f"n{self.requests}")
        if self.duration_s is not None:
            parts.append(f"d{self.duration_s:g}s")
        return "-".join(parts)


@dataclass
class PlannedRequest:
    """One request of the workload (the same for a given seed and index everywhere).

    Attributes:
        index: Position in the workload.
        prompt: User text.
        prompt_tokens: Its length in tokens of the bundle's tokenizer.
        image: Encoded image bytes, or None.
        audio: Encoded audio bytes, or None.
    """

    index: int
    prompt: str
    prompt_tokens: int
    image: bytes | None
    audio: bytes | None

    @property
    def model(self) -> str:
        """The chat ensemble this request goes to."""
        return ensemble_for(self.image is not None, self.audio is not None)


class Workload:
    """Deterministic synthetic requests: prompts of a target token length, optional media.

    Args:
        tokenizer: A Hugging Face tokenizer (the bundle's), used to size prompts.
        settings: Lengths, media shares and seed.
        max_prompt_tokens: Upper bound on a prompt's length (leave room for the chat
            template and the media rows within the server's ``max_input_len``).
        media_pool: Distinct images and audio clips to draw from (made once, up front,
            so the client spends no CPU on them during a run).
    """

    def __init__(self, tokenizer: Any, settings: BenchSettings, max_prompt_tokens: int, media_pool: int = 4) -> None:
        from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image

        self.tokenizer = tokenizer
        self.settings = settings
        self.max_prompt_tokens = max(1, max_prompt_tokens)
        sizes = [(640, 480), (320, 240), (800, 600), (256, 256)]
        seconds = [3.0, 2.0, 4.0, 2.5] if settings.audio_seconds is None else [settings.audio_seconds]
        self.images = [
            encode_image(synthetic_image(*sizes[i % len(sizes)], seed=settings.seed + i), "JPEG")
            for i in range(media_pool)
        ]
        self.audios = [
            encode_audio(synthetic_audio(16000, seconds[i % len(seconds)], seed=settings.seed + i), 16000, "WAV")
            for i in range(media_pool)
        ]

    def request(self, index: int) -> PlannedRequest:
        """The request at ``index`` (negative indices are warm-up requests)."""
        rng = np.random.default_rng([self.settings.seed, index & 0xFFFFFFFF, 1 if index < 0 else 0])
        target = int(round(rng.normal(self.settings.input_tokens, self.settings.input_spread)))
        target = min(max(1, target), self.max_prompt_tokens)
        has_image = bool(rng.random() < self.settings.image_share)
        has_audio = bool(rng.random() < self.settings.audio_share)
        prompt = self._prompt(rng, target)
        return PlannedRequest(
            index=index,
            prompt=prompt,
            prompt_tokens=self.count_tokens(prompt),
            image=self.images[int(rng.integers(len(self.images)))] if has_image else None,
            audio=self.audios[int(rng.integers(len(self.audios)))] if has_audio else None,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, rng: np.random.Generator, target: int) -> str:
        # Random words, cut right after the target-th token (offsets of a fast tokenizer);
        # re-tokenizing the cut text gives the target length up to a merge at the cut.
        n_words = max(8, target)
        while True:
            words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=n_words)]
            text = " ".join(words)
            if getattr(self.tokenizer, "is_fast", False):
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                if len(enc["input_ids"]) >= target:
                    return text[: enc["offset_mapping"][target - 1][1]].strip()
            else:
                out: list[str] = []
                for word in words:
                    out.append(word)
                    if self.count_tokens(" ".join(out)) >= target:
                        return " ".join(out)
            n_words *= 2


#: The workload's own settings, named alike in :class:`BenchSettings` and on both command lines
#: (``python -m bench`` and ``python -m bench.vllm_inprocess``).
WORKLOAD_FIELDS = ("input_tokens", "input_spread", "output_tokens", "image_share", "audio_share", "audio_seconds", "seed")


def workload_settings(args: Any) -> dict[str, Any]:
    """The :data:`WORKLOAD_FIELDS` of parsed command-line arguments, as ``BenchSettings`` keywords."""
    return {name: getattr(args, name) for name in WORKLOAD_FIELDS}


def max_prompt_tokens(max_input_len: int | None, input_tokens: int) -> int:
    """Longest user text a workload asks for, given the server's ``max_input_len``.

    Leaves 320 positions for the chat template and media rows (the limit itself still
    applies server-side); without a known limit, four times the mean length.
    """
    return (max_input_len - 320) if max_input_len else input_tokens * 4


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer in ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
