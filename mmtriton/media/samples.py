"""Small deterministic sample media, generated instead of shipped.

``python -m mmtriton.media.samples build/samples`` writes ``sample.jpg`` and
``sample.wav``; the tests and the demo use the same generators.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from scipy.signal import butter, sosfiltfilt


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, colourful RGB image with some texture, ``[H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 17 + yy / 31),
            128 + 100 * np.cos(xx / 23 - yy / 13),
            128 + 80 * np.sin((xx + yy) / 11),
        ],
        axis=-1,
    )
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_image(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    """Encode pixels as JPEG/PNG/WebP (``mode`` RGB, RGBA or L)."""
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, pixels.shape[1], dtype=np.uint8)[None, :].repeat(pixels.shape[0], axis=0)
        img = Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 92}, "WEBP": {"lossless": True}}.get(fmt.upper(), {})
    img.save(buf, fmt.upper(), **options)
    return buf.getvalue()


def synthetic_audio(sample_rate: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A chirp, a tone and band-limited noise, ``[samples, channels]`` float64 in [-1, 1].

    The noise is low-passed at 5 kHz (or 0.4 x the rate): content near the
    16 kHz pipeline's Nyquist frequency would measure resampler filter design,
    not preprocessing.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    sos = butter(10, min(5000.0, 0.4 * sample_rate), fs=sample_rate, output="sos")
    noise = sosfiltfilt(sos, rng.normal(size=t.size))
    mono = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)
    mono += 0.05 * noise * (1 + np.sin(2 * np.pi * 3 * t))
    return np.stack([mono * (1 - 0.3 * c) for c in range(channels)], axis=1)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = "WAV") -> bytes:
    """Encode as 16-bit WAV/FLAC or OGG/Vorbis."""
    buf = io.BytesIO()
    subtype = "VORBIS" if fmt.upper() == "OGG" else "PCM_16"
    soundfile.write(buf, samples, sample_rate, format=fmt.upper(), subtype=subtype)
    return buf.getvalue()


def write_samples(out_dir: Path) -> tuple[Path, Path]:
    """Write ``sample.jpg`` (640x480) and ``sample.wav`` (3 s, 16 kHz mono)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / "sample.jpg"
    audio = out_dir / "sample.wav"
    image.write_bytes(encode_image(synthetic_image(640, 480), "JPEG"))
    audio.write_bytes(encode_audio(synthetic_audio(16000, 3.0), 16000, "WAV"))
    return image, audio


def main() -> None:
    """CLI: write the sample files into a folder."""
    parser = argparse.ArgumentParser(description="Write sample.jpg and sample.wav")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for path in write_samples(args.out_dir):
        print(path)  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
