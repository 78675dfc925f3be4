"""The DALI pipelines (as rendered for the CPU profile) against independent PIL / numpy references."""

from __future__ import annotations


import numpy as np
import pytest

from mmtriton.spec import ModelSpec
from mmtriton.media.preprocess import AudioPreprocessor, ImagePreprocessor
from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image
from tests.reference import (
    RESAMPLER_SPEC,
    image_reference,
    mfcc_kwargs,
    mfcc_reference,
    mfcc_reference_bandlimited,
    mfcc_tolerance,
)


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


# Both sides decode to bit-identical pixels; what differs is the resampling: DALI's antialiased
# cubic filter keeps the exact scale (640 -> 85.33 px, ROI adjusted) where PIL resizes to a whole
# 85 px, plus FP16 output rounding. In normalized units ((pixel / 255 - mean) / std) one 8-bit
# level is about 0.017. Measured: mean 0.0001-0.032, max 0.001-0.14 (worst: 7.5x JPEG downscale).
IMAGE_MEAN_TOL = 0.05  # about 3 levels
IMAGE_MAX_TOL = 0.20  # about 12 levels


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("JPEG", "RGB", (640, 480)),
        ("JPEG", "RGB", (480, 640)),
        ("JPEG", "RGB", (50, 40)),
        ("PNG", "RGBA", (300, 500)),
        ("PNG", "L", (64, 64)),
        ("PNG", "RGB", (1000, 333)),
        ("WEBP", "RGB", (200, 90)),
        ("WEBP", "RGB", (97, 131)),
    ],
)
def test_image_matches_pil_reference(image_pre: ImagePreprocessor, spec: ModelSpec, fmt: str, mode: str, size: tuple) -> None:
    data = encode_image(synthetic_image(*size, seed=size[0]), fmt, mode)
    (result,) = image_pre([_u8(data)])
    assert not isinstance(result, Exception), result
    pixels = result[0]
    s = spec.vision.image_size
    assert pixels.shape == (3, s, s) and pixels.dtype == np.float16
    ref = image_reference(data, s, spec.vision.mean, spec.vision.std)
    diff = np.abs(pixels.astype(np.float32) - ref)
    assert diff.mean() < IMAGE_MEAN_TOL, f"mean abs diff {diff.mean():.4f}"
    assert diff.max() < IMAGE_MAX_TOL, f"max abs diff {diff.max():.4f}"


@pytest.mark.parametrize(("rate", "channels", "fmt"), [(16000, 1, "WAV"), (16000, 2, "WAV"), (16000, 1, "FLAC")])
def test_mfcc_native_rate_matches_numpy(audio_pre: AudioPreprocessor, spec: ModelSpec, rate: int, channels: int, fmt: str) -> None:
    """At the pipeline's own rate nothing is resampled: the MFCC chain must agree to 1e-3."""
    data = encode_audio(synthetic_audio(rate, 1.7, channels), rate, fmt)
    (result,) = audio_pre([_u8(data)])
    assert not isinstance(result, Exception), result
    frames, length = result
    ref = mfcc_reference(data, **mfcc_kwargs(spec))
    assert frames.shape == ref.shape and int(length[0]) == ref.shape[0]
    np.testing.assert_allclose(frames, ref, atol=1e-3, rtol=0)


# Resampled input: the reference resamples with scipy's resample_poly using the pipeline's own
# Kaiser low-pass specification (cutoff, transition width, attenuation), so every frame is
# compared. Integer ratios (48 kHz) agree to the 16 kHz tolerance; the 44.1 kHz family goes
# through DALI's fractional interpolator: measured worst 0.02, bound 0.06 (tests/test_resample.py).
@pytest.mark.parametrize(
    ("rate", "channels", "fmt"),
    [(44100, 1, "WAV"), (44100, 2, "WAV"), (48000, 1, "WAV"), (48000, 2, "WAV"), (48000, 1, "FLAC"), (44100, 2, "FLAC")],
)
def test_mfcc_downsampled_matches_numpy(audio_pre: AudioPreprocessor, spec: ModelSpec, rate: int, channels: int, fmt: str) -> None:

    data = encode_audio(synthetic_audio(rate, 1.7, channels, seed=rate + channels), rate, fmt)
    (result,) = audio_pre([_u8(data)])
    assert not isinstance(result, Exception), result
    frames, _ = result
    ref = mfcc_reference_bandlimited(data, **RESAMPLER_SPEC, **mfcc_kwargs(spec))
    assert frames.shape == ref.shape
    np.testing.assert_allclose(frames, ref, atol=mfcc_tolerance(rate), rtol=0)


def test_mfcc_upsampled_8khz_matches_numpy(audio_pre: AudioPreprocessor, spec: ModelSpec) -> None:
    """8 kHz audio has nothing above 4 kHz: the upper mel bands hold only each resampler's
    imaging residue, so the comparison covers the first 13 coefficients (the spectral envelope),
    interior frames, mean |diff| < 0.12."""
    data = encode_audio(synthetic_audio(8000, 1.7, 1), 8000, "WAV")
    (result,) = audio_pre([_u8(data)])
    assert not isinstance(result, Exception), result
    frames, _ = result
    ref = mfcc_reference(data, **mfcc_kwargs(spec))
    assert frames.shape == ref.shape
    diff = np.abs(frames - ref)[3:-3, :13]
    assert diff.mean() < 0.12, f"mean {diff.mean():.4f}"


def test_mfcc_frame_count_follows_spec(audio_pre: AudioPreprocessor, spec: ModelSpec) -> None:
    data = encode_audio(synthetic_audio(16000, 2.0, 1), 16000, "WAV")
    ((frames, length),) = audio_pre([_u8(data)])
    assert frames.shape == (spec.audio.frames(32000), spec.audio.n_mfcc)
    assert length.dtype == np.int32 and int(length[0]) == frames.shape[0]
