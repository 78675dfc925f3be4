"""Qwen2.5-Omni audio features with DALI against transformers' own ``WhisperFeatureExtractor``.

The reference is the extractor with the checkpoint's settings (128 mel bins, 300 s chunks,
``padding="max_length"`` as the processor forces), cut to the frames its attention mask
keeps. Tolerance: max |diff| 2e-4 on every frame (measured 5e-5: float32 FFTs).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from mmtriton.media.qwen2_5_omni.audio import audio_tokens, build_pipeline, feature_frames, log_mel

TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(batch_size=4)


def _speechlike(seconds: float, seed: int, channels: int = 1, level: float = 0.3) -> np.ndarray:
    """Voiced bursts with harmonics and noise, ending mid-burst (a clip cut mid-word)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 2.3 * t) > -0.2).astype(float)
    x = level * (voiced * envelope / 3 + 0.05 * rng.standard_normal(t.size))
    return np.stack([x, 0.7 * x + 0.01 * rng.standard_normal(t.size)], -1) if channels == 2 else x


def _wav(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, x.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _reference(extractor, mono: np.ndarray) -> np.ndarray:
    out = extractor(mono.astype(np.float32), sampling_rate=16000, return_tensors="np", padding="max_length", return_attention_mask=True)
    mask = out["attention_mask"][0]
    # A sample-rate mask is subsampled by the hop as the processor does; a frame-rate one is used as it is.
    frames = int(mask[::160].sum()) if mask.size > 30000 else int(mask.sum())
    return out["input_features"][0][:, :frames]


@pytest.mark.parametrize(("seconds", "channels", "level"), [(3.0, 1, 0.3), (2.337, 1, 0.3), (12.5, 2, 0.3), (1.0, 1, 1e-4)])
def test_log_mel_equals_the_extractor(extractor, pipe, seconds: float, channels: int, level: float) -> None:
    x = _speechlike(seconds, seed=int(seconds * 100), channels=channels, level=level)
    (ours,) = log_mel(pipe, [_wav(x)])
    mono = x.mean(axis=1) if channels == 2 else x  # DALI's downmix: the channels' mean
    ref = _reference(extractor, mono)
    assert ours.features.shape == ref.shape == (128, feature_frames(len(mono)))
    assert np.abs(ours.features - ref).max() < TOLERANCE


def test_a_batch_of_different_lengths_keeps_each_its_own(pipe) -> None:
    clips = [_wav(_speechlike(s, seed=i)) for i, s in enumerate((0.5, 4.2, 1.3))]
    batch = log_mel(pipe, clips)
    for clip, got in zip(clips, batch):
        (alone,) = log_mel(pipe, [clip])
        np.testing.assert_array_equal(got.features, alone.features)


def test_token_counts_are_the_processors() -> None:
    # 3 s -> 75, 30 s -> 750, 45 s -> 1125 (facts sheet, from the processor's formula).
    assert [audio_tokens(feature_frames(int(s * 16000))) for s in (3, 30, 45)] == [75, 750, 1125]


def test_other_rates_are_refused_with_a_clear_error(pipe) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(4410, dtype=np.float32), 44100, format="WAV")
    with pytest.raises(ValueError, match="at 44100 Hz; this pipeline takes 16000 Hz"):
        log_mel(pipe, [buffer.getvalue()])
