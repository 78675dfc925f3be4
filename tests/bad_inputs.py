"""Deliberately broken payloads with the error text a client must see for each.

The limits they exceed are the tiny spec's (``build_engines/specs/tiny.toml``).
"""

from __future__ import annotations

import struct

from mmtriton.spec import ModelSpec
from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces width x height (the pixel data never follows)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def strip_png(width: int, height: int) -> bytes:
    """A real, decodable gray PNG of ``width`` x ``height`` pixels (a few hundred bytes for a strip)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def corrupt_png_data(png: bytes) -> bytes:
    """A PNG whose compressed pixel data is zeroed in the middle; chunks and IEND intact."""
    data = bytearray(png)
    start = data.index(b"IDAT") + 4 + 40
    data[start : start + 200] = bytes(200)
    return bytes(data)


def bad_images(spec: ModelSpec) -> dict[str, tuple[bytes, str]]:
    """name -> (payload, substring the error message must contain)."""
    jpeg = encode_image(synthetic_image(120, 90), "JPEG")
    png = encode_image(synthetic_image(120, 90), "PNG")
    webp = encode_image(synthetic_image(120, 90), "WEBP")
    v = spec.vision
    return {
        "empty": (b"", "input 'image': empty payload"),
        "text": (b"this is not an image at all", "input 'image': not a JPEG/PNG/WebP image"),
        "wav_as_image": (encode_audio(synthetic_audio(16000, 0.1), 16000), "not a JPEG/PNG/WebP image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "input 'image': truncated JPEG: no end-of-image marker"),
        "truncated_png": (png[: len(png) // 2], "input 'image': truncated PNG: no IEND chunk"),
        # A valid signature, then no IHDR chunk: the header is damaged, not the end of the file.
        "png_signature_then_garbage": (
            png[:8] + b"garbage!" * 32,
            "input 'image': corrupt PNG header: the IHDR chunk is missing or damaged",
        ),
        "png_ihdr_crc_damaged": (
            png[:29] + bytes(b ^ 0xFF for b in png[29:33]) + png[33:],
            "input 'image': corrupt PNG header: the IHDR chunk is missing or damaged",
        ),
        "truncated_webp": (webp[: len(webp) // 2], "input 'image': truncated WebP: its RIFF header says"),
        # Passes every header check; only decoding finds the damage (DALI fails, the runner isolates it).
        "corrupt_png_data": (corrupt_png_data(png), "input 'image': could not decode the PNG data (corrupt or truncated)"),
        "corrupt_jpeg_header": (
            jpeg[:20] + bytes(200) + jpeg[220:],
            "input 'image': corrupt JPEG header: the image decoder cannot parse it",
        ),
        "too_many_pixels": (_huge_png_header(6000, 5000), f"exceeds the limit of {v.max_pixels} pixels"),
        # A real, decodable 100000x1 PNG of a few hundred bytes, under the pixel limit: its resize
        # (shorter side to image_size) would need image_size**2 * 100000 pixels.
        "extreme_aspect_ratio": (
            strip_png(100_000, 1),
            f"input 'image': image of 100000x1 has too extreme an aspect ratio (100000:1): resizing its shorter "
            f"side to {v.image_size} px would make {100_000 * v.image_size}x{v.image_size}",
        ),
        "extreme_aspect_ratio_tall": (strip_png(1, 2_000_000), "input 'image': image of 1x2000000 has too extreme an aspect ratio"),
        "too_many_bytes": (jpeg + bytes(v.max_bytes), f"exceeds the limit of {v.max_bytes} bytes"),
    }


def bad_audio(spec: ModelSpec) -> dict[str, tuple[bytes, str]]:
    """name -> (payload, substring the error message must contain)."""
    a = spec.audio
    wav = encode_audio(synthetic_audio(16000, 1.0), 16000, "WAV")
    flac = encode_audio(synthetic_audio(16000, 1.0), 16000, "FLAC")
    too_long = encode_audio(synthetic_audio(8000, a.max_seconds + 1.0), 8000, "WAV")
    return {
        "empty": (b"", "input 'audio': empty payload"),
        "text": (b"hello, this is plain text and no audio", "input 'audio': not a WAV/FLAC/OGG audio file"),
        "jpeg_as_audio": (encode_image(synthetic_image(32, 32), "JPEG"), "not a WAV/FLAC/OGG audio file"),
        "truncated_wav": (wav[: len(wav) // 2], "input 'audio': truncated WAV"),
        "truncated_flac": (flac[: len(flac) // 2], "input 'audio': could not decode the FLAC data (corrupt or truncated)"),
        "corrupt_header": (
            wav[:12] + b"\x00" * 40,
            "input 'audio': corrupt WAV header: Error in WAV file. No 'data' chunk marker.",
        ),
        "too_long": (too_long, f"exceeds the limit of {a.max_seconds:g} s"),
        "too_many_bytes": (wav + bytes(a.max_bytes), f"exceeds the limit of {a.max_bytes} bytes"),
    }
