"""Band-limited resampling in ``audio_preprocess/1/dali.py`` against scipy references.

The waveform checks run the file's second pipeline, ``audio_resampled``: the same decode
and resampling code as ``audio_preprocess``, stopping at the 16 kHz waveform. Measuring
there, rather than through the MFCC chain, sees aliasing directly: a tone folded into the
pass band is one spectral line, where log-mel features would floor it at ``cutoff_db`` and
normalize it away. The MFCC checks then cover the served pipeline end to end.
"""

from __future__ import annotations

import logging

import io
from math import gcd
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from mmtriton.spec import ModelSpec
from mmtriton.media.dali_runner import DaliRunner, SampleError, load_pipeline_module
from mmtriton.media.preprocess import AudioPreprocessor
from mmtriton.contract import InputError
from mmtriton.media.validation import MAX_AUDIO_SAMPLE_RATE
from tests.reference import (
    MODEL_RATE,
    RESAMPLER_SPEC,
    kaiser_lowpass_design,
    mfcc_kwargs,
    mfcc_reference_bandlimited,
    mfcc_tolerance,
)

# The resampler's low-pass specification (docs/audio-resampling.md), stated here and checked
# against dali.py's constants: -6 dB at 7.5 kHz, pass band to 7 kHz, stop band from 8 kHz.
# Stop-band requirement for tones above the model's Nyquist frequency, below a 1 kHz tone.
STOPBAND_DB = 60.0
# In-band noise power against scipy's resample_poly: band and tolerance.
NOISE_BAND_HZ = 7000.0  # the filter's pass band ends at 7 kHz
NOISE_TOL_DB = 0.5
LOGGER = logging.getLogger(__name__)


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _encode(x: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    subtype = "FLOAT" if fmt == "WAV" else "PCM_24"
    soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def speech_like(rate: int, seconds: float, channels: int, seed: int) -> np.ndarray:
    """Voiced segments (harmonics of a gliding pitch) alternating with broadband noise bursts,
    over a linear chirp from 100 Hz to 20 kHz: real energy up to 20 kHz, as recordings have.

    Returns:
        ``[samples, channels]`` float64 in about [-0.9, 0.9]; channels differ in gain and noise.
    """
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = 120.0 + 40.0 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 40) if k * 160.0 < rate / 2)
    segment = (np.floor(t / 0.25) % 2 == 0).astype(float)
    f1 = 20000.0
    chirp = np.sin(2 * np.pi * (100.0 * t + (f1 - 100.0) * t**2 / (2 * seconds)))
    out = []
    for c in range(channels):
        noise = rng.standard_normal(n)
        mix = 0.25 * voiced * segment + 0.3 * noise * (1 - segment) + 0.2 * chirp
        out.append((0.9 - 0.2 * c) * mix / np.max(np.abs(mix)))
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def pipeline_module(cpu_repo: Path) -> ModuleType:
    return load_pipeline_module(cpu_repo / "audio_preprocess" / "1" / "dali.py")


@pytest.fixture(scope="module")
def resampled(pipeline_module: ModuleType):
    """Run ``audio_resampled`` (CPU) on encoded bytes: the 16 kHz waveform as float64."""
    config = pipeline_module.CONFIG
    runner = DaliRunner(
        pipeline_module.audio_resampled, "audio", batch_size=config["max_batch_size"],
        num_threads=config["num_threads"], device_id=None, device="cpu",
    )
    return _make_run(runner)


def _make_run(runner: DaliRunner):
    def run(data: bytes) -> np.ndarray:
        (out,) = runner.run([_u8(data)])
        assert not isinstance(out, SampleError), out
        signal, length = out
        signal = np.asarray(signal, dtype=np.float64).reshape(-1)
        # The length the pipeline reports from integers on the CPU is the resampler's own.
        assert signal.size == int(np.asarray(length).reshape(-1)[0])
        return signal
    return run


def tone_levels(signal: np.ndarray, reference_amplitude: float) -> tuple[float, float]:
    """Level of a resampled tone, in dB re ``reference_amplitude``, interior samples only.

    Returns:
        ``(line_db, total_db)``: the largest spectral line (Blackman-Harris window, amplitude
        scale) and the whole residual's RMS as a sine amplitude (everything that came out,
        wherever it folded).
    """
    inner = signal[MODEL_RATE // 8 : -MODEL_RATE // 8]
    n = inner.size
    k = np.arange(n)
    window = (0.35875 - 0.48829 * np.cos(2 * np.pi * k / n) + 0.14128 * np.cos(4 * np.pi * k / n)
              - 0.01168 * np.cos(6 * np.pi * k / n))
    line = np.max(np.abs(np.fft.rfft(inner * window))) * 2 / window.sum()
    total = np.sqrt(2 * np.mean(inner**2))
    floor = 1e-12
    return (20 * np.log10(max(line, floor) / reference_amplitude),
            20 * np.log10(max(total, floor) / reference_amplitude))


def _tone(rate: int, freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def _check_stopband(run, rate: int, freq: float) -> None:
    passed = run(_encode(_tone(rate, 1000.0), rate))
    ref_line, _ = tone_levels(passed, 1.0)
    ref_amplitude = 10 ** (ref_line / 20)
    assert abs(ref_line - 20 * np.log10(0.5)) < 0.1, f"1 kHz tone at {ref_line:.2f} dB"
    line_db, total_db = tone_levels(run(_encode(_tone(rate, freq), rate)), ref_amplitude)
    LOGGER.info("%g Hz tone at %d Hz: line %.1f dB, all residue %.1f dB below 1 kHz", freq, rate, -line_db, -total_db)
    assert line_db < -STOPBAND_DB and total_db < -STOPBAND_DB, (line_db, total_db)


def _check_noise(run, rate: int) -> None:
    noise = 0.1 * np.random.default_rng(rate).standard_normal(2 * rate)
    ours = run(_encode(noise, rate))
    g = gcd(rate, MODEL_RATE)
    ref = resample_poly(noise, MODEL_RATE // g, rate // g)

    def band_power(x: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
        freqs = np.fft.rfftfreq(x.size, 1.0 / MODEL_RATE)
        return float(spectrum[freqs < NOISE_BAND_HZ].sum())

    diff_db = 10 * np.log10(band_power(ours) / band_power(ref))
    LOGGER.info("white noise at %d Hz: in-band power %+.3f dB against resample_poly", rate, diff_db)
    assert abs(diff_db) < NOISE_TOL_DB, f"{diff_db:.3f} dB"


@pytest.mark.parametrize("rate", [48000, 44100])
@pytest.mark.parametrize("freq", [12000.0, 20000.0])
def test_tones_above_nyquist_are_stopped(resampled, rate: int, freq: float) -> None:
    """A 12 or 20 kHz tone comes out at least 60 dB below a 1 kHz tone of the same amplitude
    (the old resampler let both through at full level, folded to 4 kHz)."""
    _check_stopband(resampled, rate, freq)


@pytest.mark.parametrize("rate", [48000, 44100, 96000])
def test_white_noise_in_band_power_matches_resample_poly(resampled, rate: int) -> None:
    """Below 7 kHz, white noise keeps its power within 0.5 dB of scipy's resample_poly (the
    old resampler folded two more bands of noise in: +4.8 dB)."""
    _check_noise(resampled, rate)


def test_filter_design_matches_scipy(pipeline_module: ModuleType) -> None:
    """The pipeline's own Kaiser design equals scipy's kaiserord + firwin for the same spec."""
    m = pipeline_module
    assert (m.CUTOFF_HZ, m.TRANSITION_HZ, m.ATTENUATION_DB) == tuple(RESAMPLER_SPEC.values())
    for k in m.DECIMATION_FACTORS:
        ours = m.kaiser_lowpass(MODEL_RATE * k, m.CUTOFF_HZ, m.TRANSITION_HZ, m.ATTENUATION_DB)
        ref = kaiser_lowpass_design(MODEL_RATE * k, m.CUTOFF_HZ, m.TRANSITION_HZ, m.ATTENUATION_DB)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-12, rtol=0)


def test_highest_rate_agrees_with_validation(pipeline_module: ModuleType) -> None:
    assert pipeline_module.MAX_INPUT_RATE == MAX_AUDIO_SAMPLE_RATE


def test_rates_above_the_maximum_are_refused(audio_pre: AudioPreprocessor) -> None:
    data = _encode(_tone(192000, 1000.0, 0.2), 192000)
    (result,) = audio_pre([_u8(data)])
    assert isinstance(result, InputError) and "192000 Hz" in str(result), result
    (ok,) = audio_pre([_u8(_encode(_tone(96000, 1000.0, 0.2), 96000))])
    assert not isinstance(ok, Exception), ok


@pytest.mark.parametrize(
    ("rate", "channels", "fmt"),
    [
        (48000, 1, "WAV"), (48000, 2, "WAV"), (48000, 1, "FLAC"), (48000, 2, "FLAC"),
        (44100, 1, "WAV"), (44100, 2, "WAV"), (44100, 1, "FLAC"), (44100, 2, "FLAC"),
        (96000, 2, "WAV"), (88200, 1, "WAV"), (32000, 1, "WAV"), (22050, 1, "FLAC"),
    ],
)
def test_speech_like_mfcc_matches_bandlimited_reference(
    audio_pre: AudioPreprocessor, pipeline_module: ModuleType, spec: ModelSpec, rate: int, channels: int, fmt: str
) -> None:
    """Clips with real energy above 8 kHz: MFCC equal the numpy reference computed on scipy's
    resample_poly signal with the same Kaiser low-pass (cutoff, transition, attenuation), on
    every frame including the first and last."""
    data = _encode(speech_like(rate, 1.7, channels, seed=rate + channels), rate, fmt)
    (result,) = audio_pre([_u8(data)])
    assert not isinstance(result, Exception), result
    frames, length = result
    ref = mfcc_reference_bandlimited(data, **RESAMPLER_SPEC, **mfcc_kwargs(spec))
    assert frames.shape == ref.shape and int(length[0]) == ref.shape[0]
    np.testing.assert_allclose(frames, ref, atol=mfcc_tolerance(rate), rtol=0)


@pytest.mark.gpu
def test_gpu_resampling_stops_tones_and_keeps_noise(pipeline_module: ModuleType) -> None:
    """The same tone and noise checks with ``device="gpu"``: filter and resampler on the GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    config = pipeline_module.CONFIG
    runner = DaliRunner(
        pipeline_module.audio_resampled, "audio", batch_size=config["max_batch_size"],
        num_threads=config["num_threads"], device_id=0, device="gpu",
    )
    run = _make_run(runner)
    for rate in (48000, 44100):
        for freq in (12000.0, 20000.0):
            _check_stopband(run, rate, freq)
        _check_noise(run, rate)


def test_gpu_graph_builds(pipeline_module: ModuleType) -> None:
    """Without a GPU, the gpu build's graph is still defined: the filter, both resamplers and the
    MFCC chain are GPU operators; only decoding and the CPU-side integers stay on the CPU."""
    pipe = pipeline_module.audio_preprocess(device="gpu", batch_size=2, num_threads=1, device_id=None)
    pipe._build_graph()  # graph definition only; building the backend would need CUDA
    devices = {}
    for op in pipe._ops:
        devices.setdefault(op._op.schema.Name(), set()).add(op._op.device)
    assert devices["Filter"] == {"gpu"} and devices["AudioResample"] == {"gpu"}, devices
    assert devices["decoders__Audio"] == {"cpu"} and devices["MFCC"] == {"gpu"}, devices
