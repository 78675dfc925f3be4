"""Checks on raw image and audio payloads before they reach a DALI batch.

DALI fails a whole batch on one bad sample, and Triton's own size limits are
far above what the encoders should see, so every payload is checked here
first: it is not empty, not over the byte limit, in a supported container,
its header is readable, its decoded size (pixels or seconds) is within the
limit, and the file is not visibly cut short (JPEG end marker, PNG IEND,
WebP RIFF size, WAV data chunk size). Each failure is
an :class:`InputError` whose message names the input and says in words what
is wrong (the limit, the damaged part); a decoding library's own reason is
passed on only without the Python object reprs PIL and libsndfile put in it.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from mmtriton.contract import InputError

IMAGE_FORMATS = ("JPEG", "PNG", "WebP")
AUDIO_FORMATS = ("WAV", "FLAC", "OGG")
# Highest sample rate audio_preprocess band-limits correctly (its dali.py MAX_INPUT_RATE).
MAX_AUDIO_SAMPLE_RATE = 96000


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an accepted image says."""

    format: str
    width: int
    height: int


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an accepted audio clip says."""

    format: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return self.frames / self.sample_rate


def as_bytes(payload: np.ndarray | bytes) -> bytes:
    """Raw bytes of a payload sent as a UINT8 tensor (any shape) or as bytes."""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return np.ascontiguousarray(payload, dtype=np.uint8).tobytes()


def sniff_image(data: bytes) -> str | None:
    """Container format from the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def sniff_audio(data: bytes) -> str | None:
    """Container format from the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    return None


#: ``<_io.BytesIO object at 0x7f...>`` and the like: a Python object's repr, meaningless to a client.
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def library_reason(err: BaseException) -> str:
    """A decoding library's own reason for an error, in words a client can use.

    PIL and libsndfile put the repr of the file object they were given into
    their messages (``Error opening <_io.BytesIO object at 0x7f...>: ...``);
    that and the empty ``Error :`` prefixes are dropped, the last meaningful
    line is kept.

    Args:
        err: The exception the library raised.

    Returns:
        The library's reason without object reprs or addresses; empty when
        nothing but a repr was left.
    """
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    text = _OBJECT_REPR.sub("", lines[-1] if lines else "")
    text = re.sub(r"^\s*Error opening\s*:?\s*", "", text)
    text = re.sub(r"^\s*Error\s*:\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip(" :")
    if text.lower() in {"cannot identify image file", "error opening"}:
        return ""
    return text


def _check_size(name: str, data: bytes, max_bytes: int, kinds: str) -> None:
    if not data:
        raise InputError(name, f"empty payload (0 bytes); expected encoded {kinds} bytes")
    if len(data) > max_bytes:
        raise InputError(name, f"payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Width and height after the preprocessing resize that brings the shorter side to ``shorter``.

    DALI's ``resize_shorter`` keeps the aspect ratio exactly; its output extent is the
    scaled longer side rounded to the nearest pixel (at least one).
    """
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter


def check_image(
    payload: np.ndarray | bytes, *, max_bytes: int, max_pixels: int, resize_shorter: int | None = None, name: str = "image"
) -> ImageInfo:
    """Check an encoded image before decoding it.

    Args:
        payload: Encoded bytes.
        max_bytes: Largest accepted payload.
        max_pixels: Largest accepted width x height, of the decoded image and (with
            ``resize_shorter``) of the image the preprocessing resize would make.
        resize_shorter: The shorter side the preprocessing resizes to, when it does: a
            strip of 100000x1 pixels is small to decode but 100000x more pixels once its
            shorter side is brought to that size, so its memory is bounded here, before
            decoding.
        name: Request input name, used in error messages.

    Returns:
        Format and size read from the header.

    Raises:
        InputError: Empty, too large, not JPEG/PNG/WebP, unreadable header,
            more pixels than ``max_pixels`` (decoded or resized), or a visibly
            truncated file.
    """
    from PIL import Image  # header parsing only; pixels are decoded by DALI

    data = as_bytes(payload)
    kinds = "/".join(IMAGE_FORMATS)
    _check_size(name, data, max_bytes, kinds)
    fmt = sniff_image(data)
    if fmt is None:
        raise InputError(name, f"not a {kinds} image (unrecognized header {data[:8]!r})")
    if fmt == "PNG" and not _png_ihdr_intact(data):
        raise InputError(name, "corrupt PNG header: the IHDR chunk is missing or damaged")
    truncated = _image_truncation(fmt, data)
    if truncated:
        raise InputError(name, truncated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise InputError(name, f"image has more pixels than the limit of {max_pixels} pixels") from None
    except Exception as err:  # PIL raises many types for broken headers
        reason = library_reason(err)
        detail = "the image decoder cannot parse it" + (f" ({reason})" if reason else "")
        raise InputError(name, f"corrupt {fmt} header: {detail}") from None
    if width * height > max_pixels:
        raise InputError(
            name, f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"
        )
    if width <= 0 or height <= 0:
        raise InputError(name, f"corrupt {fmt} header: it says {width}x{height} pixels")
    if resize_shorter is not None:
        rw, rh = resized_size(width, height, resize_shorter)
        if rw * rh > max_pixels:
            raise InputError(
                name,
                f"image of {width}x{height} has too extreme an aspect ratio ({max(width, height) / min(width, height):.0f}:1): "
                f"resizing its shorter side to {resize_shorter} px would make {rw}x{rh} = {rw * rh} pixels, "
                f"over the limit of {max_pixels} pixels",
            )
    return ImageInfo(fmt, width, height)


def _png_ihdr_intact(data: bytes) -> bool:
    """True when a PNG's signature is followed by a 13-byte IHDR chunk with a matching CRC."""
    if len(data) < 33:
        return False
    length, kind = struct.unpack_from(">I4s", data, 8)
    if length != 13 or kind != b"IHDR":
        return False
    (crc,) = struct.unpack_from(">I", data, 29)
    return zlib.crc32(data[12:29]) == crc


def _image_truncation(fmt: str, data: bytes) -> str | None:
    """Why an image's container is visibly cut short, or None.

    A JPEG's last scan must be followed by its end-of-image marker (the marker
    bytes cannot occur inside entropy-coded data, and an EXIF thumbnail's own
    marker comes before the main image's scans); a PNG must hold its IEND
    chunk; a WebP must be as long as its RIFF header says.
    """
    if fmt == "JPEG":
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            return "truncated JPEG: no end-of-image marker after the last scan"
    elif fmt == "PNG":
        if data.rfind(b"IEND") < 0:
            return "truncated PNG: no IEND chunk"
    elif fmt == "WebP":
        declared = struct.unpack_from("<I", data, 4)[0] + 8 if len(data) >= 8 else 0
        if declared > len(data):
            return f"truncated WebP: its RIFF header says {declared} bytes, the payload has {len(data)}"
    return None


def _wav_data_shortfall(data: bytes) -> int:
    """Bytes missing from the WAV ``data`` chunk (0 when complete or no chunk found)."""
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        if chunk_id == b"data":
            available = len(data) - (pos + 8)
            # 0xFFFFFFFF / 0 mark a streamed WAV of unknown length: nothing to compare.
            if size in (0, 0xFFFFFFFF):
                return 0
            return max(0, size - available)
        pos += 8 + size + (size & 1)
    return 0


def check_audio(
    payload: np.ndarray | bytes, *, max_bytes: int, max_seconds: float, name: str = "audio", full_decode: bool = False
) -> AudioInfo:
    """Check an encoded audio clip before decoding it.

    Args:
        payload: Encoded bytes.
        max_bytes: Largest accepted payload.
        max_seconds: Longest accepted duration.
        name: Request input name, used in error messages.
        full_decode: Also decode FLAC/OGG completely (on the CPU) to find damage no
            header shows. For where a DALI batch cannot isolate a bad sample.

    Returns:
        Format, sample rate, channels and frames read from the header.

    Raises:
        InputError: Empty, too large, not WAV/FLAC/OGG, unreadable header,
            truncated WAV data, or longer than ``max_seconds``.
    """
    import soundfile  # header parsing only; samples are decoded by DALI

    data = as_bytes(payload)
    kinds = "/".join(AUDIO_FORMATS)
    _check_size(name, data, max_bytes, kinds)
    fmt = sniff_audio(data)
    if fmt is None:
        raise InputError(name, f"not a {kinds} audio file (unrecognized header {data[:8]!r})")
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:  # libsndfile reports every header problem as a RuntimeError
        reason = library_reason(err) or "the decoder cannot read it"
        raise InputError(name, f"corrupt {fmt} header: {reason}") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise InputError(name, f"corrupt {fmt} header: {info.samplerate} Hz, {info.channels} channels")
    if fmt == "WAV":
        missing = _wav_data_shortfall(data)
        if missing:
            raise InputError(name, f"truncated WAV: the data chunk is {missing} bytes shorter than its header says")
    if info.samplerate > MAX_AUDIO_SAMPLE_RATE:
        raise InputError(
            name, f"sample rate of {info.samplerate} Hz exceeds the supported maximum of {MAX_AUDIO_SAMPLE_RATE} Hz"
        )
    result = AudioInfo(fmt, int(info.samplerate), int(info.channels), int(info.frames))
    if result.frames <= 0:
        raise InputError(name, f"{fmt} audio holds no samples")
    if result.seconds > max_seconds:
        raise InputError(name, f"audio of {result.seconds:.2f} s exceeds the limit of {max_seconds:g} s")
    if full_decode and fmt != "WAV":
        try:
            soundfile.read(io.BytesIO(data), dtype="int16")
        except Exception as err:  # libsndfile reports decoder errors as RuntimeError/LibsndfileError
            detail = library_reason(err) or "the decoder stopped"
            raise InputError(name, f"could not decode the {fmt} data (corrupt or truncated): {detail}") from None
    return result
