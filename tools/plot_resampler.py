"""Plot the audio resampler's low-pass filters (docs/audio-resampling.png).

Loads ``model_repository/audio_preprocess/1/dali.py`` with a ``preprocess.json``
written from a model spec (as the CPU profile renders it, into a temporary
folder), takes the Kaiser FIRs it builds for each intermediate rate and plots
their magnitude response in dB, with the stop-band requirement marked.

    .venv/bin/python tools/plot_resampler.py [--spec build_engines/specs/tiny.toml] [--out docs/audio-resampling.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build_engines.render import PROFILES, preprocess_settings  # noqa: E402
from mmtriton.spec import load_spec  # noqa: E402
from mmtriton.media.dali_runner import load_pipeline_module  # noqa: E402


def response_db(taps: np.ndarray, rate: float, n_points: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude response of an FIR in dB (floored at -200 dB) on ``[0, rate / 2]``.

    Args:
        taps: Filter coefficients.
        rate: Sample rate the filter runs at, in Hz.
        n_points: FFT length (zero-padded).

    Returns:
        Frequencies in Hz and the response in dB.
    """
    spectrum = np.abs(np.fft.rfft(taps, n_points))
    freqs = np.fft.rfftfreq(n_points, 1.0 / rate)
    return freqs, 20.0 * np.log10(np.maximum(spectrum, 1e-10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "build_engines" / "specs" / "tiny.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "audio-resampling.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp) / "audio_preprocess" / "1"
        version.mkdir(parents=True)
        shutil.copy(ROOT / "model_repository" / "audio_preprocess" / "1" / "dali.py", version / "dali.py")
        settings = preprocess_settings(spec, "audio_preprocess", PROFILES["cpu"], 1)
        (version / "preprocess.json").write_text(json.dumps(settings))
        module = load_pipeline_module(version / "dali.py")

    model_rate = module.CONFIG["sample_rate"]
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4))
    for k in module.DECIMATION_FACTORS:
        rate = model_rate * k
        taps = module.kaiser_lowpass(rate, module.CUTOFF_HZ, module.TRANSITION_HZ, module.ATTENUATION_DB)
        freqs, db = response_db(taps, rate)
        label = f"{rate / 1000:g} kHz, {taps.size} taps"
        full.plot(freqs / 1000, db, label=label, linewidth=0.8)
        zoom.plot(freqs / 1000, db, label=label, linewidth=0.8)
        stop = db[freqs >= module.STOPBAND_HZ].max()
        ripple = np.abs(db[freqs <= module.CUTOFF_HZ - module.TRANSITION_HZ / 2]).max()
        print(f"{label}: stop band (>= {module.STOPBAND_HZ:g} Hz) max {stop:.1f} dB, pass band ripple {ripple:.4f} dB")
    for ax in (full, zoom):
        ax.axvline(module.STOPBAND_HZ / 1000, color="k", linestyle=":", linewidth=0.8)
        ax.axhline(-module.ATTENUATION_DB, color="r", linestyle="--", linewidth=0.8, label=f"-{module.ATTENUATION_DB:g} dB")
        ax.set_xlabel("frequency (kHz)")
        ax.grid(True, alpha=0.3)
    full.set_ylabel("gain (dB)")
    full.set_ylim(-160, 5)
    full.set_xlim(0, model_rate * module.DECIMATION_FACTORS[-1] / 2000)
    full.set_title("Kaiser low-pass before decimation to 16 kHz")
    zoom.set_xlim((module.STOPBAND_HZ - 2 * module.TRANSITION_HZ) / 1000, (module.STOPBAND_HZ + module.TRANSITION_HZ) / 1000)
    zoom.set_ylim(-120, 5)
    zoom.set_title("transition band")
    zoom.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
