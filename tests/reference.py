"""Independent reference implementations (PIL / numpy / scipy) of the preprocessing.

They share no code with the DALI pipelines: the tests compare the two.
"""

from __future__ import annotations

import io
from math import gcd

import numpy as np

from mmtriton.spec import ModelSpec
import soundfile
from PIL import Image
from scipy.signal import firwin, kaiserord, resample_poly


def image_reference(data: bytes, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """PIL decode -> RGB -> bicubic resize of the shorter side -> center crop -> normalize, CHW float32."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    width, height = rgb.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # Crop offsets round half up, as DALI's crop_pos 0.5 does (Python's round() goes to even).
    left, top = int(np.floor((new_w - size) / 2 + 0.5)), int(np.floor((new_h - size) / 2 + 0.5))
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    normalized = (crop - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return normalized.transpose(2, 0, 1)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear below 1 kHz, logarithmic above.
    freq = np.asarray(freq, dtype=np.float64)
    linear = freq / (200.0 / 3)
    log_region = 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(freq >= 1000.0, log_region, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    log_region = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_region, linear)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the Slaney mel scale, each with unit area, ``[n_mels, n_fft//2+1]``."""
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    filters = np.zeros((n_mels, bins.size))
    for m in range(n_mels):
        lo, center, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (bins - lo) / (center - lo)
        falling = (hi - bins) / (hi - center)
        filters[m] = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))
    return filters


def dct2_ortho(n_out: int, n_in: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``[n_out, n_in]``."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    basis[0] /= np.sqrt(2.0)
    return basis


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """libsndfile decode, channel mean, polyphase resampling to ``sample_rate``."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float64", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    return mono


def mfcc_reference(
    data: bytes,
    *,
    sample_rate: int,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    n_mfcc: int,
    preemphasis: float,
    cutoff_db: float,
    norm_epsilon: float,
) -> np.ndarray:
    """MFCC frames ``[T, n_mfcc]`` computed with numpy only, normalized per coefficient over time."""
    x = decode_audio(data, sample_rate)
    # Pre-emphasis with the first sample repeated before the start.
    y = np.empty_like(x)
    y[0] = x[0] * (1.0 - preemphasis)
    y[1:] = x[1:] - preemphasis * x[:-1]
    pad = n_fft // 2
    padded = np.pad(y, pad, mode="reflect")
    frames = 1 + y.size // hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    idx = np.arange(n_fft)[None, :] + hop_length * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2  # [T, bins]
    mel = power @ mel_filters(sample_rate, n_fft, n_mels).T  # [T, n_mels]
    # Decibels relative to the clip's loudest bin, floored at cutoff_db.
    log_mel = 10.0 * np.log10(np.maximum(mel / mel.max(), 10.0 ** (cutoff_db / 10.0)))
    mfcc = log_mel @ dct2_ortho(n_mfcc, n_mels).T  # [T, n_mfcc]
    mean = mfcc.mean(axis=0, keepdims=True)
    var = mfcc.var(axis=0, keepdims=True)
    return (mfcc - mean) / np.sqrt(var + norm_epsilon)


def kaiser_lowpass_design(
    rate: float, cutoff_hz: float, transition_hz: float, attenuation_db: float
) -> np.ndarray:
    """Kaiser-window low-pass FIR designed by scipy (``kaiserord`` + ``firwin``), odd length.

    Args:
        rate: Sample rate the filter runs at, in Hz.
        cutoff_hz: The -6 dB point.
        transition_hz: Pass-band to stop-band width.
        attenuation_db: Stop-band attenuation to design for.

    Returns:
        The taps, unit gain at DC.
    """
    numtaps, beta = kaiserord(attenuation_db, transition_hz / (rate / 2.0))
    return firwin(numtaps | 1, cutoff_hz, window=("kaiser", beta), fs=rate)


def decode_audio_bandlimited(
    data: bytes, sample_rate: int, *, cutoff_hz: float, transition_hz: float, attenuation_db: float
) -> np.ndarray:
    """libsndfile decode, channel mean, then polyphase resampling with a given low-pass.

    Downsampling uses ``resample_poly`` with a Kaiser FIR of the stated cutoff, transition
    width and attenuation, designed at the polyphase rate (input rate times ``up``): the
    ideal band-limited resampler for that filter specification. Upsampling (nothing to
    band-limit) and equal rates are as :func:`decode_audio`.
    """
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float64", always_2d=True)
    mono = samples.mean(axis=1)
    rate = int(rate)
    if rate <= sample_rate:
        return decode_audio(data, sample_rate)
    g = gcd(rate, int(sample_rate))
    up, down = sample_rate // g, rate // g
    h = kaiser_lowpass_design(rate * up, cutoff_hz, transition_hz, attenuation_db)
    return resample_poly(mono, up, down, window=h)


def mfcc_reference_bandlimited(
    data: bytes,
    *,
    cutoff_hz: float,
    transition_hz: float,
    attenuation_db: float,
    **kwargs: float,
) -> np.ndarray:
    """:func:`mfcc_reference` on the signal of :func:`decode_audio_bandlimited`.

    ``kwargs`` are :func:`mfcc_reference`'s keyword arguments.
    """
    signal = decode_audio_bandlimited(
        data,
        int(kwargs["sample_rate"]),
        cutoff_hz=cutoff_hz,
        transition_hz=transition_hz,
        attenuation_db=attenuation_db,
    )
    # Handed to mfcc_reference as a 32-bit float WAV at the model rate (nothing is resampled
    # again); float32 is what the DALI pipeline computes in, so no precision that matters is lost.
    buf = io.BytesIO()
    soundfile.write(buf, signal, int(kwargs["sample_rate"]), format="WAV", subtype="FLOAT")
    return mfcc_reference(buf.getvalue(), **kwargs)


#: The resampler's filter design in ``audio_preprocess/1/dali.py`` (pass band to 7.5 kHz, 1 kHz
#: transition, 80 dB stop band), for references built with the same Kaiser design.
RESAMPLER_SPEC = {"cutoff_hz": 7500.0, "transition_hz": 1000.0, "attenuation_db": 80.0}
#: MFCC against the numpy reference on a resample_poly signal with the same Kaiser design, every
#: frame. Integer decimation (48, 96 kHz) is the same filter, so the 16 kHz tolerance holds.
#: Other rates first pass DALI's fractional interpolator (upsampling to 48 kHz), whose error floor
#: is about -93 dB re peak; log-mel bins near the -80 dB floor amplify it in the high-order
#: coefficients. Measured worst |diff| on every frame of the test clips: 0.019 (44.1 kHz), 0.044
#: (22.05 kHz), 0.005 (88.2 kHz), 0.024 (32 kHz); docs/audio-resampling.md. Bound: 0.06.
MFCC_ATOL = 1e-3
MFCC_ATOL_FRACTIONAL = 0.06
#: The model's sample rate in the tiny spec.
MODEL_RATE = 16000


def mfcc_tolerance(rate: int) -> float:
    """The MFCC tolerance for a clip at ``rate``: 1e-3 where only integer decimation (or nothing)
    happens, i.e. the model rate and the intermediate rates 48 and 96 kHz."""
    return MFCC_ATOL if rate in (MODEL_RATE, 3 * MODEL_RATE, 6 * MODEL_RATE) else MFCC_ATOL_FRACTIONAL


def mfcc_kwargs(spec: ModelSpec) -> dict:
    """The MFCC settings of a spec, as :func:`mfcc_reference` takes them."""
    a = spec.audio
    return {
        "sample_rate": a.sample_rate, "n_fft": a.n_fft, "hop_length": a.hop_length, "n_mels": a.n_mels,
        "n_mfcc": a.n_mfcc, "preemphasis": a.preemphasis, "cutoff_db": a.cutoff_db, "norm_epsilon": a.norm_epsilon,
    }
