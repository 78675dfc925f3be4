"""OpenAI chat messages -> the ensembles' ``messages`` input and the raw media bytes.

Content parts become the conversation's parts in place (``image_url`` -> an image
part, ``input_audio`` -> an audio part), so the chat template puts the placeholders
where the parts were. The media themselves are only unwrapped (base64 decoded, or
fetched); nothing here decodes an image or a clip: the ensemble does, and its
verdict on a bad payload comes back as a 400 naming the part.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from openai_frontend.errors import bad_request

#: Image types a ``data:`` URL may declare (what the ``image_preprocess`` model decodes).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
#: ``input_audio.format`` values (what the ``audio_preprocess`` model decodes).
AUDIO_FORMATS = ("wav", "flac", "ogg")
#: OpenAI roles; ``developer`` (newer clients' name for the system prompt) is sent as ``system``.
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.S)


@dataclass(frozen=True)
class MediaLimits:
    """Per-request media limits (from the model spec and the ensembles' inputs).

    Attributes:
        max_images: Images per request (the chat ensembles take one).
        max_audios: Audio clips per request (the chat ensembles take one).
        image_max_bytes: Encoded bytes per image (``vision.max_bytes``).
        audio_max_bytes: Encoded bytes per clip (``audio.max_bytes``).
    """

    max_images: int = 1
    max_audios: int = 1
    image_max_bytes: int = 20 * 1024 * 1024
    audio_max_bytes: int = 16 * 1024 * 1024


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
    compact = "".join(data.split())
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


async def _image_bytes(part: dict[str, Any], param: str, limits: MediaLimits, fetch: Fetcher) -> bytes:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: image_url needs a 'url' string", param)
    if url.startswith("data:"):
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
    data, content_type = await fetch(url, limits.image_max_bytes, param)
    if content_type and content_type not in IMAGE_TYPES and content_type != "application/octet-stream":
        raise bad_request(
            f"{param}: the URL serves {content_type!r}, not one of {', '.join(IMAGE_TYPES)}", param, "unsupported_media_type"
        )
    if not data:
        raise bad_request(f"{param}: the URL served an empty body", param)
    return data


def _audio_bytes(part: dict[str, Any], param: str, limits: MediaLimits) -> bytes:
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
    return decode_base64(spec.get("data"), limits.audio_max_bytes, param, "audio")


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
                out.audio, out.audio_param = _audio_bytes(part, param, limits), param
            parts.append({"type": media})
        out.messages.append({"role": role, "content": parts})
    return out
