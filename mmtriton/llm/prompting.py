"""Turn a user request into TensorRT-LLM engine inputs (the ``preprocessing`` model's logic).

The chat template comes from the tokenizer in the bundle. Each ``<image>`` /
``<audio>`` placeholder becomes as many fake ids as its embeddings have rows:
``vocab_size .. vocab_size + n - 1`` across the whole request, in order of
appearance, and the rows are concatenated into ``prompt_embedding_table``
(FP16 ``[rows, hidden]``) with ``prompt_vocab_size = rows``. This is the
prompt-tuning contract of the TensorRT-LLM Triton backend.

A request carries either one user turn (``text_input``, :meth:`PromptBuilder.build`)
or a whole conversation (``messages``, :meth:`PromptBuilder.build_conversation`):
system, user and assistant turns as JSON, whose image and audio parts become
the placeholders where the parts were. Either way the chat template is applied
once, here, so a client never renders it and the engine sees one prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.contract import InputError
from mmtriton.llm.generation import check_sampling_values


@dataclass(frozen=True)
class Prompt:
    """Engine inputs for one request.

    Attributes:
        input_ids: INT32 ``[n]`` with fake ids for the multimodal rows.
        prompt_table: FP16 ``[rows, hidden]``, or None for text-only prompts.
        text_tokens: Ids that came from text (template included).
    """

    input_ids: np.ndarray
    prompt_table: np.ndarray | None
    text_tokens: int


def stop_words_tensor(words: list[list[int]]) -> np.ndarray:
    """Encode token sequences in TensorRT-LLM's ``stop_words_list`` layout ``[2, n]``.

    Row 0 holds every sequence's ids back to back; row 1 the end offset of
    each sequence, padded with -1. No sequences encode as ``[[0], [-1]]``.
    """
    flat = [t for word in words for t in word]
    offsets = np.cumsum([len(w) for w in words]).tolist() if words else []
    width = max(1, len(flat))
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, :] = 0
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def parse_stop_words(tensor: np.ndarray) -> list[list[int]]:
    """Inverse of :func:`stop_words_tensor` for one request's ``[2, n]`` tensor."""
    ids, offsets = tensor[0].tolist(), [o for o in tensor[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if end > start:
            words.append(ids[start:end])
        start = end
    return words


#: Roles a conversation may hold (the OpenAI chat roles the chat templates know).
ROLES = ("system", "user", "assistant")
#: Media part types and the embeddings they stand for.
MEDIA_PARTS = ("image", "audio")


@dataclass(frozen=True)
class Conversation:
    """A parsed ``messages`` input.

    Attributes:
        messages: ``{"role", "content"}`` dicts whose content is plain text with the
            image/audio placeholders where the media parts were.
        images: How many image parts the conversation has.
        audios: How many audio parts the conversation has.
        enable_thinking: Passed to the chat template when set (templates that know it
            switch a reasoning mode on or off; others ignore it).
    """

    messages: list[dict[str, str]]
    images: int
    audios: int
    enable_thinking: bool | None = None


def parse_conversation(raw: str | bytes, image_token: str, audio_token: str) -> Conversation:
    """Check the ``messages`` JSON and render each turn's parts to text with placeholders.

    The payload is ``{"messages": [...], "enable_thinking": bool}`` (the flag optional).
    A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image"}`` or ``{"type": "audio"}``. Parts of one message are joined with a
    newline, so one user turn ``[image, audio, text]`` renders exactly as ``text_input``
    with its media in front does. Placeholder text inside a text part is refused: media
    travel as parts, never as text a user could forge.

    Args:
        raw: The UTF-8 JSON.
        image_token: The image placeholder.
        audio_token: The audio placeholder.

    Returns:
        The conversation, ready for the chat template.

    Raises:
        InputError: Not JSON, wrong shape, an unknown role or part type, placeholder text.
    """
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError("messages", f"not valid JSON ({err.__class__.__name__}: {err})") from None
    except RecursionError:
        raise InputError("messages", "JSON nested too deeply") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list) or not payload["messages"]:
        raise InputError("messages", 'must be a JSON object {"messages": [...]} with at least one message')
    thinking = payload.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise InputError("messages", "enable_thinking must be true, false or absent")
    tokens = {"image": image_token, "audio": audio_token}
    counts = {"image": 0, "audio": 0}
    rendered: list[dict[str, str]] = []
    for i, message in enumerate(payload["messages"]):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise InputError("messages", f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if content is None:
            parts = []
        if not isinstance(parts, list):
            raise InputError("messages", f"{where}.content must be a string or a list of parts")
        texts: list[str] = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            at = f"{where}.content" if isinstance(content, str) else f"{where}.content[{j}]"
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise InputError("messages", f"{at}: a text part needs a string 'text'")
                for token in tokens.values():
                    if token in text:
                        raise InputError("messages", f"{at}: contains {token}; send media as image/audio parts")
                texts.append(text)
            elif kind in MEDIA_PARTS:
                counts[kind] += 1
                texts.append(tokens[kind])
            else:
                raise InputError("messages", f"{at}: part type {kind!r} is not text, image or audio")
        rendered.append({"role": message["role"], "content": "\n".join(texts)})
    return Conversation(rendered, counts["image"], counts["audio"], thinking)


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds for user sampling inputs."""

    max_output_len: int


def check_sampling(
    *,
    max_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    limits: SamplingLimits,
) -> None:
    """Reject sampling values the engine cannot honour, naming the public input.

    Raises:
        InputError: ``max_tokens`` outside ``1..max_output_len``, a negative or
            non-finite ``temperature``, a negative ``top_k``, ``top_p`` outside [0, 1].
    """
    if max_tokens < 1 or max_tokens > limits.max_output_len:
        raise InputError("max_tokens", f"{max_tokens} is outside 1..{limits.max_output_len}")
    check_sampling_values(temperature, top_k, top_p)


class PromptBuilder:
    """Chat template, tokenization and placeholder expansion for one model bundle.

    Args:
        tokenizer_dir: Folder with the Hugging Face tokenizer (the bundle's ``llm/``).
        vocab_size: The LLM's vocabulary size; fake ids start here.
        hidden_size: The LLM's hidden size (prompt-table width).
        image_token: Placeholder text for an image.
        audio_token: Placeholder text for an audio clip.
        max_input_len: Longest prompt the engine accepts, fake ids included.
    """

    def __init__(
        self,
        tokenizer_dir: Path,
        *,
        vocab_size: int,
        hidden_size: int,
        image_token: str,
        audio_token: str,
        max_input_len: int,
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.image_token = image_token
        self.audio_token = audio_token
        self.image_id = self.tokenizer.convert_tokens_to_ids(image_token)
        self.audio_id = self.tokenizer.convert_tokens_to_ids(audio_token)
        self.max_input_len = max_input_len
        # No token stands for more text than its own vocabulary string spells (byte-level BPE writes
        # each byte as one 1-2 byte character, SentencePiece writes a space as 3-byte "▁", byte
        # fallback pieces are "<0xNN>"), so a text of B UTF-8 bytes is at least B / longest tokens.
        self.max_token_bytes = max(len(token.encode("utf-8")) for token in self.tokenizer.get_vocab())
        #: Longest text (UTF-8 bytes) that could still fit ``max_input_len``; longer ones are refused untokenized.
        self.max_text_bytes = self.max_input_len * self.max_token_bytes

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> PromptBuilder:
        """The builder the ``preprocessing`` model's rendered parameters describe.

        The one place they are read: the model itself and the benchmark's in-process
        anchor (``bench.vllm_inprocess``) build prompts the same way.
        """
        return cls(
            Path(params["tokenizer_dir"]),
            vocab_size=int(params["vocab_size"]),
            hidden_size=int(params["hidden_size"]),
            image_token=params["image_token"],
            audio_token=params["audio_token"],
            max_input_len=int(params["max_input_len"]),
        )

    def check_text_size(self, source: str, texts: list[str]) -> None:
        """Refuse text that cannot fit the engine's input length, before any tokenizing.

        Tokenizing megabytes takes seconds on the preprocessing model's thread, and every
        request behind it waits, so a text over :attr:`max_text_bytes` is refused by its size.

        Args:
            source: The input the text came from (``text_input`` or ``messages``).
            texts: The request's text pieces.

        Raises:
            InputError: Their UTF-8 size is over :attr:`max_text_bytes`.
        """
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_text_bytes:
            raise InputError(
                source,
                f"text of {size} bytes cannot fit the engine's max input length of {self.max_input_len} tokens "
                f"(no token of this tokenizer is longer than {self.max_token_bytes} bytes, so at most "
                f"{self.max_text_bytes} bytes can fit); refused before tokenizing",
            )

    def _content(self, text: str, has_image: bool, has_audio: bool) -> str:
        for token, present, name in ((self.image_token, has_image, "image"), (self.audio_token, has_audio, "audio")):
            count = text.count(token)
            if count > 1:
                raise InputError("text_input", f"contains {count} {token} placeholders; one {name} per request is supported")
            if count and not present:
                raise InputError("text_input", f"contains {token} but no {name} was sent")
        # Media without a placeholder go first, in a fixed order: image, then audio.
        prefix = ""
        if has_image and self.image_token not in text:
            prefix += self.image_token + "\n"
        if has_audio and self.audio_token not in text:
            prefix += self.audio_token + "\n"
        return prefix + text

    def build(
        self,
        text: str,
        image_embeddings: np.ndarray | None = None,
        audio_embeddings: np.ndarray | None = None,
    ) -> Prompt:
        """Build the engine inputs of one request.

        Args:
            text: The user's message (may contain the placeholders).
            image_embeddings: ``[rows, hidden]`` from ``vision_encoder``, if an image was sent.
            audio_embeddings: ``[rows, hidden]`` from ``audio_encoder``, if audio was sent.

        Returns:
            The prompt with fake ids and its table.

        Raises:
            InputError: Placeholder/media mismatch, wrong embedding width, or a
                prompt longer than ``max_input_len``.
        """
        self.check_text_size("text_input", [text])
        content = self._content(text, image_embeddings is not None, audio_embeddings is not None)
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return self._expand(ids, image_embeddings, audio_embeddings, "text_input")

    def build_conversation(
        self,
        raw: str | bytes,
        image_embeddings: np.ndarray | None = None,
        audio_embeddings: np.ndarray | None = None,
    ) -> Prompt:
        """Build the engine inputs of a whole conversation (the ``messages`` input).

        Args:
            raw: The ``messages`` JSON (see :func:`parse_conversation`).
            image_embeddings: ``[rows, hidden]`` from ``vision_encoder``, if an image was sent.
            audio_embeddings: ``[rows, hidden]`` from ``audio_encoder``, if audio was sent.

        Returns:
            The prompt with fake ids and its table.

        Raises:
            InputError: A malformed conversation, more than one image or clip, media parts
                and media sent that do not match, or a prompt over ``max_input_len``.
        """
        conv = parse_conversation(raw, self.image_token, self.audio_token)
        self.check_text_size("messages", [m["content"] for m in conv.messages])
        for name, parts, sent in (("image", conv.images, image_embeddings), ("audio", conv.audios, audio_embeddings)):
            if parts > 1:
                raise InputError("messages", f"has {parts} {name} parts; one {name} per request is supported")
            if parts and sent is None:
                raise InputError("messages", f"has an {name} part but no {name} was sent")
            if not parts and sent is not None:
                raise InputError("messages", f"an {name} was sent but no message has an {name} part")
        extra = {} if conv.enable_thinking is None else {"enable_thinking": conv.enable_thinking}
        ids = self.tokenizer.apply_chat_template(
            conv.messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
        )
        return self._expand(ids, image_embeddings, audio_embeddings, "messages")

    def _expand(
        self, ids: list[int], image_embeddings: np.ndarray | None, audio_embeddings: np.ndarray | None, source: str
    ) -> Prompt:
        """Replace each placeholder id by its fake ids and gather the prompt table; check the length."""
        media = {self.image_id: image_embeddings, self.audio_id: audio_embeddings}
        out: list[int] = []
        rows: list[np.ndarray] = []
        next_fake = self.vocab_size
        text_tokens = 0
        for token in ids:
            table = media.get(token)
            if table is None:
                out.append(int(token))
                text_tokens += 1
                continue
            table = np.asarray(table, dtype=np.float16).reshape(-1, np.shape(table)[-1])
            if table.shape[1] != self.hidden_size:
                raise InputError("prompt_embedding_table", f"width {table.shape[1]} != LLM hidden size {self.hidden_size}")
            out.extend(range(next_fake, next_fake + table.shape[0]))
            next_fake += table.shape[0]
            rows.append(table)
        if len(out) > self.max_input_len:
            media_rows = len(out) - text_tokens
            raise InputError(
                source,
                f"prompt is {len(out)} tokens ({text_tokens} text + {media_rows} image/audio), "
                f"over the engine's max input length of {self.max_input_len}",
            )
        table = np.concatenate(rows) if rows else None
        return Prompt(np.asarray(out, dtype=np.int32), table, text_tokens)

    def encode_stop_words(self, words: list[str]) -> np.ndarray:
        """Tokenize stop strings (no special tokens) into the ``stop_words_list`` layout."""
        seqs = [self.tokenizer.encode(w, add_special_tokens=False) for w in words if w]
        return stop_words_tensor([s for s in seqs if s])
