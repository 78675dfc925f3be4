"""OpenAI chat messages -> the ensembles' ``messages`` input and the raw media bytes.

Content parts become the conversation's parts in place (``image_url`` -> an image
part, ``input_audio`` -> an audio part), so the chat template puts the placeholders
where the parts were. The media themselves are only unwrapped (base64 decoded, or
fetched); nothing here decodes an image or a clip: the ensemble does, and its
verdict on a bad payload comes back as a 400 naming the part. Base64 payloads over
:data:`OFFLOAD_BYTES` are decoded in a worker thread, so that the event loop keeps
answering other requests meanwhile.

The prompt's length is bounded here too, before anything goes to Triton: a text of
``B`` UTF-8 bytes is at least ``ceil(B / L)`` tokens, ``L`` being the most text
bytes one token of the tokenizer can stand for (:func:`longest_token_bytes`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from openai_frontend.errors import bad_request

if TYPE_CHECKING:
    from mmtriton.spec import ModelSpec

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

#: Image types a ``data:`` URL may declare (what the ``image_preprocess`` model decodes).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
#: ``input_audio.format`` values (what the ``audio_preprocess`` model decodes).
AUDIO_FORMATS = ("wav", "flac", "ogg")
#: OpenAI roles; ``developer`` (newer clients' name for the system prompt) is sent as ``system``.
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)
_SPACE = re.compile(r"\s")
#: Payloads (and request bodies) larger than this are handled in a worker thread, off the event loop.
OFFLOAD_BYTES = 256 * 1024
#: Roles whose text :func:`prompt_text_bytes` counts: chat templates render system and user text
#: (some trim it); assistant turns are left out, since some templates drop parts of earlier
#: answers (their reasoning).
COUNTED_ROLES = frozenset({"system", "developer", "user"})


@dataclass(frozen=True)
class MediaLimits:
    """Per-request media limits (from the model spec and the ensembles' inputs).

    Attributes:
        image_max_bytes: Encoded bytes per image (``vision.max_bytes``).
        audio_max_bytes: Encoded bytes per clip (``audio.max_bytes``).
        max_images: Images per request (the chat ensembles take one).
        max_audios: Audio clips per request (the chat ensembles take one).
    """

    image_max_bytes: int
    audio_max_bytes: int
    max_images: int = 1
    max_audios: int = 1

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> MediaLimits:
        """The byte limits the model spec defines (``vision.max_bytes``, ``audio.max_bytes``).

        Args:
            spec: The model spec (a bundle's ``bundle.json`` holds it).

        Returns:
            The limits.
        """
        return cls(image_max_bytes=spec.vision.max_bytes, audio_max_bytes=spec.audio.max_bytes)


@dataclass
class ParsedMessages:
    """The conversation for the ``messages`` input and the media it refers to.

    Attributes:
        messages: ``{"role", "content"}`` with parts ``text`` / ``image`` / ``audio``.
        image: The image's encoded bytes, or None.
        audio: The clip's encoded bytes, or None.
        image_param: Where the image came from (``messages[i].content[j]``), for error messages.
        audio_param: Where the clip came from.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    image: bytes | None = None
    audio: bytes | None = None
    image_param: str | None = None
    audio_param: str | None = None


#: Fetches an http(s) URL for a part: ``(url, max_bytes, param) -> (bytes, content type)``.
Fetcher = Callable[[str, int, str], Awaitable[tuple[bytes, str]]]


def decode_base64(data: Any, max_bytes: int, param: str, what: str) -> bytes:
    """Decode a base64 payload, refusing it before decoding when it cannot fit ``max_bytes``.

    Raises:
        APIError: Not a string, not base64, empty, or over ``max_bytes`` once decoded.
    """
    if not isinstance(data, str):
        raise bad_request(f"{param}: {what} data must be a base64 string", param)
    compact = "".join(data.split()) if _SPACE.search(data) else data
    if len(compact) // 4 * 3 > max_bytes + 3:
        size = len(compact) // 4 * 3
        raise bad_request(
            f"{param}: {what} is about {size} bytes, over the limit of {max_bytes} bytes per {what}", param, f"{what}_too_large"
        )
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: {what} data is not valid base64", param, "invalid_base64") from None
    if not raw:
        raise bad_request(f"{param}: {what} data is empty", param)
    if len(raw) > max_bytes:
        raise bad_request(
            f"{param}: {what} is {len(raw)} bytes, over the limit of {max_bytes} bytes per {what}", param, f"{what}_too_large"
        )
    return raw


async def off_loop_if_large(size: int, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)``, in a worker thread when ``size`` (a payload's or a body's bytes) is over :data:`OFFLOAD_BYTES`.

    The thread is anyio's, never the event loop's default executor that ``/health``'s probe uses.

    Args:
        size: The bytes ``func`` works through.
        func: What to run.
        args: Its arguments.

    Returns:
        What ``func`` returned.
    """
    if size > OFFLOAD_BYTES:
        return await anyio.to_thread.run_sync(func, *args)
    return func(*args)


def _data_url_bytes(url: str, param: str, limits: MediaLimits) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise bad_request(f"{param}: malformed data URL (expected data:image/<type>;base64,<data>)", param)
    mime, params, payload = match.group(1).strip().lower(), match.group(2).lower(), match.group(3)
    if mime not in IMAGE_TYPES:
        raise bad_request(
            f"{param}: unsupported image type {mime or '(none)'!r}; supported: {', '.join(IMAGE_TYPES)}",
            param,
            "unsupported_media_type",
        )
    if ";base64" not in params:
        raise bad_request(f"{param}: the data URL must be base64 encoded (data:{mime};base64,...)", param)
    return decode_base64(payload, limits.image_max_bytes, param, "image")


async def _image_bytes(part: dict[str, Any], param: str, limits: MediaLimits, fetch: Fetcher) -> bytes:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: image_url needs a 'url' string", param)
    if url.startswith("data:"):
        return await off_loop_if_large(len(url), _data_url_bytes, url, param, limits)
    data, content_type = await fetch(url, limits.image_max_bytes, param)
    if content_type and content_type not in IMAGE_TYPES and content_type != "application/octet-stream":
        raise bad_request(
            f"{param}: the URL serves {content_type!r}, not one of {', '.join(IMAGE_TYPES)}", param, "unsupported_media_type"
        )
    if not data:
        raise bad_request(f"{param}: the URL served an empty body", param)
    return data


async def _audio_bytes(part: dict[str, Any], param: str, limits: MediaLimits) -> bytes:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise bad_request(f"{param}: input_audio must be an object {{data, format}}", param)
    fmt = str(spec.get("format", "")).lower()
    if fmt not in AUDIO_FORMATS:
        raise bad_request(
            f"{param}: unsupported audio format {fmt or '(none)'!r}; supported: {', '.join(AUDIO_FORMATS)}",
            param,
            "unsupported_media_type",
        )
    data = spec.get("data")
    size = len(data) if isinstance(data, str) else 0
    return await off_loop_if_large(size, decode_base64, data, limits.audio_max_bytes, param, "audio")


async def parse_messages(messages: Any, limits: MediaLimits, fetch: Fetcher) -> ParsedMessages:
    """Check OpenAI chat messages and split them into the conversation and its media.

    Args:
        messages: The request's ``messages``.
        limits: Media counts and sizes.
        fetch: Fetches http(s) image URLs (refusing them when fetching is off).

    Returns:
        The conversation and the media bytes.

    Raises:
        APIError: 400 naming ``messages[i]`` / ``messages[i].content[j]`` and the limit.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = ParsedMessages()
    counts = {"image": 0, "audio": 0}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = ROLE_MAP.get(str(message.get("role")))
        if role is None:
            raise bad_request(
                f"{where}: role {message.get('role')!r} is not supported; use system, developer, user or assistant",
                f"{where}.role",
            )
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.messages.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{param}: a text part needs a 'text' string", param)
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image_url", "input_audio"):
                raise bad_request(
                    f"{param}: content part type {kind!r} is not supported; use text, image_url or input_audio",
                    param,
                    "unsupported_content_part",
                )
            media = "image" if kind == "image_url" else "audio"
            if role != "user":
                raise bad_request(f"{param}: {kind} parts are accepted in user messages only", param)
            counts[media] += 1
            limit = limits.max_images if media == "image" else limits.max_audios
            if counts[media] > limit:
                noun = "image" if media == "image" else "audio clip"
                raise bad_request(
                    f"{param}: too many {noun}s: at most {limit} {noun} per request", param, f"too_many_{media}s"
                )
            if media == "image":
                out.image, out.image_param = await _image_bytes(part, param, limits, fetch), param
            else:
                out.audio, out.audio_param = await _audio_bytes(part, param, limits), param
            parts.append({"type": media})
        out.messages.append({"role": role, "content": parts})
    return out


def prompt_text_bytes(messages: Any) -> int:
    """UTF-8 bytes of the text the chat template renders for certain: system and user turns.

    Each string content and each ``text`` part counts without its leading and trailing
    whitespace (templates such as Llama 3's ``trim`` it); assistant turns do not count
    (:data:`COUNTED_ROLES`). Anything malformed counts 0: :func:`parse_messages` refuses it.
    """
    total = 0
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict) or message.get("role") not in COUNTED_ROLES:
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts: list[Any] = [content]
        elif isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        else:
            texts = []
        total += sum(len(t.strip().encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))
    return total


def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE writes raw bytes as (GPT-2's table): the printable
    Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards. A vocabulary
    string made of them stands for as many bytes of text as it has characters."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return frozenset([chr(b) for b in printable] + [chr(0x100 + i) for i in range(256 - len(printable))])


#: Pre-tokenizers that split the text without dropping any of it.
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"})


def _drops_text(pre: dict[str, Any] | None) -> str | None:
    """Why a pre-tokenizer can make text vanish (whitespace splitters, ``Removed`` splits), or None."""
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        return next((r for r in map(_drops_text, pre.get("pretokenizers", [])) if r), None)
    if kind not in _KEEPING_PRE_TOKENIZERS:
        return f"pre-tokenizer {kind} may drop text"
    if pre.get("behavior") == "Removed":
        return f"pre-tokenizer {kind} removes what it splits on"
    return None


def _shrinks_text(norm: dict[str, Any] | None) -> str | None:
    """Why a normalizer can make the text shorter in bytes (Unicode composition, stripping...), or None."""
    if norm is None:
        return None
    kind = norm.get("type")
    if kind == "Sequence":
        return next((r for r in map(_shrinks_text, norm.get("normalizers", [])) if r), None)
    if kind == "Prepend":
        return None
    if kind == "Replace":
        pattern = (norm.get("pattern") or {}).get("String")
        if isinstance(pattern, str) and len(str(norm.get("content", "")).encode()) >= len(pattern.encode()):
            return None
    return f"normalizer {kind} may shorten the text"


def longest_token_bytes(tokenizer_json: Path) -> int | None:
    """The most bytes of text one token can stand for, read from a Hugging Face ``tokenizer.json``.

    Every token covers a piece of the normalized, pre-tokenized text, and the pieces cover
    all of it, so a text of ``B`` bytes is at least ``ceil(B / L)`` tokens when ``L`` is at
    least the bytes of every vocabulary entry and added token. Byte-level vocabularies
    (``ByteLevel`` pre-tokenizer) count one byte per character of the entry; any other entry
    counts its UTF-8 bytes, which is never less than the text it covers (``▁`` for a space,
    ``<0xNN>`` for one byte). That holds only when nothing shrinks or drops text on the way,
    so the bound is refused (None, with a warning) for tokenizers where something can: a
    normalizer other than ``Prepend`` / a lengthening ``Replace``, a pre-tokenizer that drops
    text, added tokens that swallow whitespace (``lstrip`` / ``rstrip``), a model other than
    BPE, or an unknown-token that fuses runs of unknown characters.

    Args:
        tokenizer_json: The bundle's ``llm/tokenizer.json``.

    Returns:
        ``L``, or None when no such bound holds for this tokenizer (or the file is missing).
    """
    try:
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        LOGGER.warning("no prompt length bound in the front door: cannot read %s (%s)", tokenizer_json, err)
        return None
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    reason = _shrinks_text(spec.get("normalizer")) or _drops_text(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE":
        reason = reason or f"model {model.get('type')} can map long words to one unknown token"
    elif model.get("unk_token") and model.get("fuse_unk") and not model.get("byte_fallback"):
        reason = reason or "runs of unknown characters fuse into one token"
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        reason = reason or "an added token strips the whitespace beside it"
    if reason:
        LOGGER.warning("no prompt length bound in the front door for %s: %s", tokenizer_json, reason)
        return None
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    alphabet = _byte_level_alphabet() if byte_level else frozenset()

    def size(text: str) -> int:
        if byte_level and all(ch in alphabet for ch in text):
            return len(text)
        return len(text.encode("utf-8"))

    vocab = model.get("vocab") or {}
    longest = max([size(t) for t in vocab] + [len(str(t.get("content", "")).encode("utf-8")) for t in added], default=0)
    if model.get("unk_token"):
        longest = max(longest, 4)  # one unknown character: at most 4 bytes
    return longest or None
