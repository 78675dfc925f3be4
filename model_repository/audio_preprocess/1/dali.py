"""Audio preprocessing as one DALI pipeline: decode, resample, MFCC, normalize.

Decoding (WAV, FLAC, OGG) runs on the CPU in DALI; when ``device`` is ``gpu``
the samples move to the GPU right after decoding and the whole MFCC chain
(pre-emphasis, spectrogram, mel filter bank, decibels, DCT, normalization)
runs there. The CPU profile builds the same definition with ``device_id=None``
and ``device="cpu"``. Constants come from ``preprocess.json`` beside this file.
"""

import json
import math
from pathlib import Path

import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.plugin.triton import autoserialize

CONFIG = json.loads((Path(__file__).with_name("preprocess.json")).read_text())


def periodic_hann(length: int) -> list:
    """Periodic Hann window, written out so no library default decides its shape."""
    return [0.5 - 0.5 * math.cos(2.0 * math.pi * n / length) for n in range(length)]


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
    decoded, _ = fn.decoders.audio(encoded, sample_rate=sample_rate, downmix=True, dtype=types.FLOAT)
    # Frame count from the decoded length on the CPU (centered windows: 1 + samples // hop), so
    # no GPU -> CPU transfer is needed inside the pipeline.
    length = decoded.shape(dtype=types.INT32)[0:1] // CONFIG["hop_length"] + 1
    if device == "gpu":
        decoded = decoded.gpu()
    emphasized = fn.preemphasis_filter(decoded, preemph_coeff=CONFIG["preemphasis"])
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
