"""Run a DALI pipeline definition on a batch, isolating samples that break it.

DALI fails a whole batch when one sample fails, and after such an error the
pipeline object is no longer usable. :class:`DaliRunner` runs the batch once;
if it fails it rebuilds the pipeline and runs every sample alone, so each bad
sample gets its own error and the good ones in the same batch still succeed.
The python-backend preprocessing models use it (``device_id=None`` on the CPU, a GPU
ordinal in the gpu-hf and gpu-vllm profiles).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)


def load_pipeline_module(path: Path, module_name: str | None = None) -> ModuleType:
    """Import a ``dali.py`` pipeline definition from its file.

    Args:
        path: The ``dali.py`` file (its ``preprocess.json`` must sit beside it).
        module_name: Name to register it under; defaults to one derived from the path.

    Returns:
        The imported module.
    """
    name = module_name or f"_dali_{path.parent.parent.name}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import DALI pipeline from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class SampleError(RuntimeError):
    """DALI could not process one sample (decoder or operator error)."""


class DaliRunner:
    """Runs a ``@pipeline_def`` function over lists of samples fed to one external source.

    Args:
        pipeline_fn: The decorated pipeline definition (e.g. ``module.image_preprocess``).
        input_name: Name of the ``fn.external_source`` to feed.
        batch_size: Largest batch the pipeline is built for.
        num_threads: DALI CPU worker threads.
        device_id: ``None`` for CPU-only pipelines, a GPU ordinal otherwise.
        **pipeline_kwargs: Arguments of the pipeline function itself (e.g. ``decoder_device``).
    """

    def __init__(
        self,
        pipeline_fn: Callable[..., Any],
        input_name: str,
        *,
        batch_size: int,
        num_threads: int,
        device_id: int | None = None,
        **pipeline_kwargs: Any,
    ) -> None:
        self._pipeline_fn = pipeline_fn
        self._input_name = input_name
        self.batch_size = batch_size
        self._num_threads = num_threads
        self._device_id = device_id
        self._kwargs = pipeline_kwargs
        self.rebuilds = 0
        self._pipe = self._build()

    def _build(self) -> Any:
        # Synchronous execution: one feed, one run, no prefetch queue to drain after an error.
        pipe = self._pipeline_fn(
            batch_size=self.batch_size,
            num_threads=self._num_threads,
            device_id=self._device_id,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
            **self._kwargs,
        )
        pipe.build()
        return pipe

    def _run_batch(self, samples: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        self._pipe.feed_input(self._input_name, list(samples))
        outputs = self._pipe.run()
        results: list[tuple[np.ndarray, ...]] = []
        for i in range(len(samples)):
            row = []
            for out in outputs:
                if hasattr(out, "as_cpu"):
                    out = out.as_cpu()
                row.append(np.array(out.at(i)))
            results.append(tuple(row))
        return results

    def run(self, samples: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...] | SampleError]:
        """Process samples; return per sample its outputs or the error it caused.

        Args:
            samples: 1-D uint8 arrays of encoded bytes, any number of them.

        Returns:
            One entry per sample, in order: a tuple of the pipeline's outputs, or a
            :class:`SampleError` naming what DALI reported for that sample alone.
        """
        results: list[tuple[np.ndarray, ...] | SampleError] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            try:
                results.extend(self._run_batch(chunk))
                continue
            except RuntimeError as err:
                self._rebuild()
                if len(chunk) == 1:
                    results.append(SampleError(_reason(err)))
                    continue
                LOGGER.warning("DALI batch of %d failed (%s); running its samples one by one", len(chunk), _reason(err))
            for sample in chunk:
                try:
                    results.append(self._run_batch([sample])[0])
                except RuntimeError as err:
                    results.append(SampleError(_reason(err)))
                    self._rebuild()
        return results

    def _rebuild(self) -> None:
        # After an error DALI reports "Current pipeline object is no longer valid".
        self.rebuilds += 1
        self._pipe = self._build()


def _reason(err: BaseException) -> str:
    """The part of a DALI error after its pipeline traceback ("encountered: ...")."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "no longer valid" not in ln]
    return (lines or [type(err).__name__])[0][:300]
