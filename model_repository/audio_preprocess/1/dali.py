"""Audio preprocessing as one DALI pipeline: decode, band-limited resample, MFCC, normalize.

Decoding (WAV, FLAC, OGG) runs on the CPU in DALI; when ``device`` is ``gpu``
the samples move to the GPU right after decoding and everything after it
(resampling with its low-pass filter, pre-emphasis, spectrogram, mel filter
bank, decibels, DCT, normalization) runs there. The cpu profile builds the
same definition with ``device_id=None`` and ``device="cpu"``; every other profile on the GPU. Constants come
from ``preprocess.json`` beside this file.

Resampling (docs/audio-resampling.md): DALI's resampler interpolates with a
sinc at the *input* rate's Nyquist frequency, which is right for upsampling but
lets everything above the output's Nyquist frequency alias when downsampling.
So a clip is first upsampled (never downsampled) to an intermediate rate that
is an integer multiple of the model rate, low-passed there with a Kaiser FIR
whose stop band starts at the model rate's Nyquist frequency, and only then
decimated, at an integer ratio, where DALI's resampler picks every k-th sample.
Clips at or below the model rate need no low-pass (their 1-tap filter is 1.0).
"""

import json
import math
from pathlib import Path

import numpy as np
import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.plugin.triton import autoserialize

CONFIG = json.loads((Path(__file__).with_name("preprocess.json")).read_text())

# Intermediate rates, as multiples of the model rate: 3x (48 kHz for 16 kHz) takes every input
# rate up to 48 kHz, 6x (96 kHz) every rate up to 96 kHz. Higher rates are refused before
# decoding (mmtriton.media.validation.MAX_AUDIO_SAMPLE_RATE must equal MAX_INPUT_RATE).
DECIMATION_FACTORS = (3, 6)
MAX_INPUT_RATE = CONFIG["sample_rate"] * DECIMATION_FACTORS[-1]
# Low-pass design, in Hz relative to the model rate: the stop band starts at its Nyquist
# frequency (nothing above it may alias), the pass band ends one transition width below.
STOPBAND_HZ = CONFIG["sample_rate"] / 2.0
TRANSITION_HZ = CONFIG["sample_rate"] / 16.0
CUTOFF_HZ = STOPBAND_HZ - TRANSITION_HZ / 2.0
ATTENUATION_DB = 80.0
# DALI's interpolating sinc: 100 = 64 lobes, the most accurate setting (the default 50 is 16).
RESAMPLE_QUALITY = 100.0
# DALI's resampler is less accurate in the first few dozen output samples of a clip (measured:
# 1e-3 at 44.1 kHz, 6e-3 at 22.05 kHz against an ideal zero-padded resampler, 2e-5 elsewhere).
# Clips above the model rate are therefore resampled with this much silence in front, which is
# cut off again at the model rate; 0.2 s is a whole number of samples at every rate divisible
# by 5 (all the common ones). Other rates skip the lead-in and keep the small start error.
LEAD_IN_SAMPLES = CONFIG["sample_rate"] // 5


def periodic_hann(length: int) -> list:
    """Periodic Hann window, written out so no library default decides its shape."""
    return [0.5 - 0.5 * math.cos(2.0 * math.pi * n / length) for n in range(length)]


def kaiser_beta(attenuation_db: float) -> float:
    """Kaiser's empirical window shape parameter for a stop-band attenuation in dB."""
    if attenuation_db > 50.0:
        return 0.1102 * (attenuation_db - 8.7)
    if attenuation_db >= 21.0:
        return 0.5842 * (attenuation_db - 21.0) ** 0.4 + 0.07886 * (attenuation_db - 21.0)
    return 0.0


def kaiser_numtaps(rate: float, transition_hz: float, attenuation_db: float) -> int:
    """Kaiser's estimate of the FIR length for a transition width at ``rate``, rounded up to odd.

    Odd lengths keep the filter centred on a sample, so filtering delays nothing.
    """
    width = 2.0 * math.pi * transition_hz / rate
    taps = math.ceil((attenuation_db - 7.95) / (2.285 * width)) + 1
    return taps | 1


def kaiser_lowpass(rate: float, cutoff_hz: float, transition_hz: float, attenuation_db: float) -> np.ndarray:
    """Windowed-sinc low-pass FIR (Kaiser window), unit gain at DC, float64.

    Args:
        rate: Sample rate the filter runs at, in Hz.
        cutoff_hz: The -6 dB point (the ideal filter's edge).
        transition_hz: Width of the band from pass band to stop band.
        attenuation_db: Stop-band attenuation the length and window are chosen for.

    Returns:
        The odd-length, symmetric taps.
    """
    taps = kaiser_numtaps(rate, transition_hz, attenuation_db)
    beta = kaiser_beta(attenuation_db)
    half = (taps - 1) / 2.0
    n = np.arange(taps) - half
    window = np.i0(beta * np.sqrt(1.0 - (n / half) ** 2)) / np.i0(beta)
    ideal = (2.0 * cutoff_hz / rate) * np.sinc(2.0 * cutoff_hz / rate * n)
    h = ideal * window
    return h / h.sum()


def lowpass_table() -> tuple[np.ndarray, list[int], list[int]]:
    """All low-pass filters in one flat float32 array, with each one's offset and length.

    Entry 0 is the 1-tap identity for clips at or below the model rate; entry ``i`` for
    ``i >= 1`` runs at ``DECIMATION_FACTORS[i - 1]`` times the model rate.
    """
    rate = CONFIG["sample_rate"]
    filters = [np.ones(1)] + [
        kaiser_lowpass(rate * k, CUTOFF_HZ, TRANSITION_HZ, ATTENUATION_DB) for k in DECIMATION_FACTORS
    ]
    lengths = [f.size for f in filters]
    offsets = [sum(lengths[:i]) for i in range(len(filters))]
    return np.concatenate(filters).astype(np.float32), offsets, lengths


def resample_to_model_rate(decoded, rate, device: str):
    """Band-limited resampling of decoded mono audio to ``CONFIG["sample_rate"]``.

    Args:
        decoded: 1-D float32 samples at ``rate``, on the CPU.
        rate: The clip's sample rate (the decoder's second output), a float32 scalar on the CPU.
        device: ``"cpu"`` or ``"gpu"``; filtering and resampling run there.

    Returns:
        The resampled samples on ``device`` and their count as an INT64 ``[1]`` on the CPU
        (computed from the input length the way DALI's resampler sizes its output,
        ``ceil(n * out_rate / in_rate)``, so the GPU build needs no GPU -> CPU copy).
    """
    model_rate = CONFIG["sample_rate"]
    # Per clip, which intermediate rate and which filter: step i is 1 when the rate is above
    # factors[i - 1] times the model rate, so the sums below land on entry (number of steps).
    factors = (1,) + DECIMATION_FACTORS
    table, offsets, lengths = lowpass_table()
    mid, start, length = model_rate, offsets[0], lengths[0]
    for i in range(1, len(factors)):
        step = fn.cast(rate > model_rate * factors[i - 1], dtype=types.INT64)
        mid = mid + step * (model_rate * (factors[i] - factors[i - 1]))
        start = start + step * (offsets[i] - offsets[i - 1])
        length = length + step * (lengths[i] - lengths[i - 1])
    kernel = fn.slice(
        types.Constant(table, device="cpu"),
        fn.reshape(start, shape=[1]),
        fn.reshape(length, shape=[1]),
        axes=[0],
        normalized_anchor=False,
        normalized_shape=False,
    )
    kernel = fn.reshape(kernel, shape=[1, -1], layout="HW")

    # Output lengths in integers on the CPU: INT64, since n * rate overflows INT32 for long clips.
    in_rate = fn.cast(rate, dtype=types.INT64)
    n_in = decoded.shape(dtype=types.INT64)[0:1]
    n_mid = (n_in * mid + in_rate - 1) // in_rate
    n_out = (n_mid * model_rate + mid - 1) // mid
    # Lead-in (see LEAD_IN_SAMPLES): a whole number of input samples, so that it adds exactly
    # lead_out samples at the model rate and moves nothing else.
    use_lead = fn.cast(rate > model_rate, dtype=types.INT64) * fn.cast(in_rate % 5 == 0, dtype=types.INT64)
    lead_in = use_lead * (in_rate * LEAD_IN_SAMPLES // model_rate)
    lead_out = use_lead * LEAD_IN_SAMPLES
    silence = fn.full(fn.constant(fdata=0.0, shape=[]), shape=fn.cast(lead_in, dtype=types.INT32))
    padded = fn.cat(silence, decoded, axis=0)

    mid_rate = fn.cast(mid, dtype=types.FLOAT)
    if device == "gpu":
        padded = padded.gpu()
    # Upsampling only (mid >= rate): the resampler's sinc at the input's Nyquist is the right filter.
    upsampled = fn.audio_resample(padded, in_rate=rate, out_rate=mid_rate, quality=RESAMPLE_QUALITY)
    # The filter op is a 2-D correlation; a symmetric kernel makes it a convolution. Zeros outside
    # the clip, as a polyphase resampler pads.
    row = fn.reshape(upsampled, shape=[1, -1], layout="HW")
    filtered = fn.filter(row, kernel, border="constant", mode="same")
    flat = fn.reshape(filtered, shape=[-1])
    # Integer ratio: the resampler's sinc is exactly 1 at the kept samples and 0 at the others.
    resampled = fn.audio_resample(flat, in_rate=mid_rate, out_rate=float(model_rate), quality=RESAMPLE_QUALITY)
    resampled = fn.slice(
        resampled, fn.cast(lead_out, dtype=types.INT32), fn.cast(n_out, dtype=types.INT32),
        axes=[0], normalized_anchor=False, normalized_shape=False,
    )
    return resampled, n_out


def _decode(encoded):
    decoded, rate = fn.decoders.audio(encoded, downmix=True, dtype=types.FLOAT)
    return decoded, rate


@autoserialize
@dali.pipeline_def(
    batch_size=CONFIG["max_batch_size"],
    num_threads=CONFIG["num_threads"],
    device_id=CONFIG["device_id"],
)
def audio_preprocess(device: str = CONFIG["device"]):
    """Encoded bytes (``audio``) -> MFCC frames ``[T, n_mfcc]`` FP32 and ``T`` as INT32 ``[1]``."""
    sample_rate = CONFIG["sample_rate"]
    n_fft = CONFIG["n_fft"]
    encoded = fn.external_source(name="audio", dtype=types.UINT8, ndim=1, device="cpu")
    decoded, rate = _decode(encoded)
    resampled, n_out = resample_to_model_rate(decoded, rate, device)
    # Frame count from the resampled length known on the CPU (centered windows: 1 + samples // hop).
    length = fn.cast(n_out // CONFIG["hop_length"] + 1, dtype=types.INT32)
    emphasized = fn.preemphasis_filter(resampled, preemph_coeff=CONFIG["preemphasis"])
    power = fn.spectrogram(
        emphasized,
        nfft=n_fft,
        window_length=n_fft,
        window_step=CONFIG["hop_length"],
        window_fn=periodic_hann(n_fft),
        power=2,
        center_windows=True,
        reflect_padding=True,
    )
    mel = fn.mel_filter_bank(
        power,
        sample_rate=sample_rate,
        nfilter=CONFIG["n_mels"],
        freq_low=0.0,
        freq_high=sample_rate / 2.0,
        mel_formula="slaney",
        normalize=True,
    )
    # No fixed reference: decibels are relative to each clip's loudest bin, floored at cutoff_db.
    log_mel = fn.to_decibels(mel, multiplier=10.0, cutoff_db=CONFIG["cutoff_db"])
    mfcc = fn.mfcc(log_mel, n_mfcc=CONFIG["n_mfcc"], dct_type=2, normalize=True, axis=0)
    # Per-coefficient normalization over time; epsilon keeps silence finite.
    normalized = fn.normalize(mfcc, axes=[1], epsilon=CONFIG["norm_epsilon"])
    frames = fn.transpose(normalized, perm=[1, 0])
    return frames, length


@dali.pipeline_def(
    batch_size=CONFIG["max_batch_size"],
    num_threads=CONFIG["num_threads"],
    device_id=CONFIG["device_id"],
)
def audio_resampled(device: str = CONFIG["device"]):
    """Encoded bytes (``audio``) -> the model-rate waveform the MFCC chain sees, and its length.

    For tests and measurements only (not served): the same decode and resampling code as
    :func:`audio_preprocess`, stopping before pre-emphasis.
    """
    encoded = fn.external_source(name="audio", dtype=types.UINT8, ndim=1, device="cpu")
    decoded, rate = _decode(encoded)
    return resample_to_model_rate(decoded, rate, device)
