"""Qwen2.5-Omni audio features with DALI: Whisper log-mel, equal to its ``WhisperFeatureExtractor``.

The processor (``shared/reference/qwen2.5-omni-facts.md`` §4) zero-pads every clip to 300 s,
takes a centered STFT (n_fft 400, hop 160, periodic Hann, reflect padding at the start),
drops the last frame, applies 128 Slaney mel filters (0-8000 Hz), takes
``log10(max(mel, 1e-10))``, clamps to the clip's maximum minus 8 and maps ``(x + 4) / 4``;
the audio tower reads the first ``ceil(samples / 160)`` frames (``feature_attention_mask``).

Here only those frames are computed: the clip is zero-padded by one window (every frame
that touches the clip is then the processor's, and the processor's further frames are pure
padding at -10, which never sets the maximum), the maximum is taken over them, and the
result is cut to ``ceil(samples / 160)`` frames. Input: 16 kHz clips (mono or downmixed);
other rates are refused with a clear error until the band-limited resampler of the
project's own ``audio_preprocess`` serves this family too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
MAX_SECONDS = 300.0


@dataclass(frozen=True)
class AudioFeatures:
    """One clip's features: ``[128, frames]`` float32 log-mel and its frame count."""

    features: np.ndarray
    frames: int


def feature_frames(samples: int) -> int:
    """Frames the audio tower reads for a clip of ``samples`` at 16 kHz (``ceil(samples / 160)``)."""
    return math.ceil(samples / HOP)


def audio_tokens(frames: int) -> int:
    """Rows the audio tower makes of ``frames`` feature frames (two stride-2 steps)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _periodic_hann(length: int) -> list[float]:
    n = np.arange(length)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / length)).tolist()


def build_pipeline(*, batch_size: int, num_threads: int = 2, device_id: int | None = None) -> object:
    """The DALI pipeline: encoded bytes in; log-mel ``[128, ceil(L/160)]`` and the sample rate out."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    device = "cpu" if device_id is None else "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_async=False, exec_pipelined=False)
    def qwen_audio() -> tuple[object, object]:
        encoded = fn.external_source(name="audio", dtype=types.UINT8, ndim=1)
        decoded, rate = fn.decoders.audio(encoded, downmix=True, dtype=types.FLOAT)
        samples = decoded.shape(dtype=types.INT32)
        tail = fn.full(fn.constant(fdata=0.0, shape=[]), shape=[N_FFT])
        padded = fn.cat(decoded, tail, axis=0)
        if device == "gpu":
            padded = padded.gpu()
        power = fn.spectrogram(
            padded, nfft=N_FFT, window_length=N_FFT, window_step=HOP, window_fn=_periodic_hann(N_FFT),
            power=2, center_windows=True, reflect_padding=True,
        )  # fmt: skip
        mel = fn.mel_filter_bank(
            power, sample_rate=SAMPLE_RATE, nfilter=N_MELS, freq_low=0.0, freq_high=SAMPLE_RATE / 2.0,
            mel_formula="slaney", normalize=True,
        )  # fmt: skip
        # 10 log10(max(mel, 1e-10)) with a fixed reference of 1 (DALI's default is each clip's maximum).
        log_mel = fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=-100.0) / 10.0
        peak = fn.reductions.max(log_mel)
        clamped = (dmath.max(log_mel, peak - 8.0) + 4.0) / 4.0
        frames = (samples + (HOP - 1)) // HOP
        features = fn.slice(clamped, fn.constant(idata=[0]), frames, axes=[1])
        return features, rate

    pipe = qwen_audio()
    pipe.build()
    return pipe


def log_mel(pipe: object, payloads: Sequence[bytes]) -> list[AudioFeatures]:
    """Run a batch of encoded 16 kHz clips through the pipeline.

    Raises:
        ValueError: A clip is not at 16 kHz.
    """
    pipe.feed_input("audio", [np.frombuffer(p, dtype=np.uint8) for p in payloads])
    features, rates = pipe.run()
    if hasattr(features, "as_cpu"):
        features = features.as_cpu()
    out = []
    for i in range(len(payloads)):
        rate = float(np.array(rates.at(i)))
        if rate != SAMPLE_RATE:
            raise ValueError(f"clip {i} is at {rate:g} Hz; this pipeline takes {SAMPLE_RATE} Hz")
        array = np.array(features.at(i), dtype=np.float32)
        out.append(AudioFeatures(array, array.shape[1]))
    return out
