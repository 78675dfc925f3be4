"""Image and audio preprocessing for the python-backend runners (the cpu, gpu-hf and gpu-vllm profiles).

Each preprocessor loads the model's own ``1/dali.py`` definition (the file the
gpu-trtllm profile's DALI backend serializes) on the device ``preprocess.json``
names (``device_id`` None: the CPU), checks every payload with
:mod:`mmtriton.media.validation`, runs the good ones through DALI as one batch and
returns, per request, either the outputs or an :class:`InputError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.media.dali_runner import DaliRunner, SampleError, load_pipeline_module
from mmtriton.contract import InputError
from mmtriton.media.validation import check_audio, check_image, sniff_audio, sniff_image

LOGGER = logging.getLogger(__name__)


class _Preprocessor:
    """Validate payloads, run the valid ones through a DALI pipeline, keep errors per request."""

    input_name: str

    def __init__(self, pipeline_file: Path, pipeline_name: str) -> None:
        module = load_pipeline_module(Path(pipeline_file))
        self.config: dict[str, Any] = module.CONFIG
        device_kwargs = self._device_kwargs(self.config)
        self.runner = DaliRunner(
            getattr(module, pipeline_name),
            self.input_name,
            batch_size=self.config["max_batch_size"],
            num_threads=self.config["num_threads"],
            device_id=self.config["device_id"],
            **device_kwargs,
        )
        self._check: Callable[[np.ndarray], Any] = self._make_check(self.config)

    @staticmethod
    def _device_kwargs(config: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _make_check(self, config: dict[str, Any]) -> Callable[[np.ndarray], Any]:
        raise NotImplementedError

    def _sniff(self, payload: np.ndarray) -> str | None:
        raise NotImplementedError

    def _after(self, outputs: tuple[np.ndarray, ...], info: Any) -> tuple[np.ndarray, ...]:
        return outputs

    def __call__(self, payloads: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...] | InputError]:
        """Preprocess one payload per request.

        Args:
            payloads: Encoded bytes as 1-D uint8 arrays.

        Returns:
            Per payload, the pipeline outputs or the error that payload caused.
        """
        results: list[tuple[np.ndarray, ...] | InputError | None] = [None] * len(payloads)
        infos: dict[int, Any] = {}
        for i, payload in enumerate(payloads):
            try:
                infos[i] = self._check(payload)
            except InputError as err:
                results[i] = err.detached()
        good = sorted(infos)
        samples = [np.ascontiguousarray(payloads[i], dtype=np.uint8).reshape(-1) for i in good]
        for i, out in zip(good, self.runner.run(samples)):
            if isinstance(out, SampleError):
                fmt = self._sniff(payloads[i]) or "data"
                results[i] = InputError(
                    self.input_name, f"could not decode the {fmt} data (corrupt or truncated): {out}"
                )
            else:
                try:
                    results[i] = self._after(out, infos[i])
                except InputError as err:
                    results[i] = err.detached()
        return [r for r in results if r is not None]


class ImagePreprocessor(_Preprocessor):
    """``image_preprocess``: encoded image -> ``pixel_values`` FP16 ``[3, S, S]``.

    Args:
        pipeline_file: The model's ``1/dali.py`` (with ``preprocess.json`` beside it).
    """

    input_name = "image"

    def __init__(self, pipeline_file: Path) -> None:
        super().__init__(pipeline_file, "image_preprocess")

    @staticmethod
    def _device_kwargs(config: dict[str, Any]) -> dict[str, Any]:
        return {"decoder_device": config["decoder_device"]}

    def _make_check(self, config: dict[str, Any]) -> Callable[[np.ndarray], Any]:
        return partial(
            check_image,
            max_bytes=config["max_bytes"],
            max_pixels=config["max_pixels"],
            resize_shorter=config["image_size"],
            name="image",
        )

    def _sniff(self, payload: np.ndarray) -> str | None:
        return sniff_image(np.asarray(payload, dtype=np.uint8).tobytes()[:16])


class AudioPreprocessor(_Preprocessor):
    """``audio_preprocess``: encoded audio -> MFCC frames FP32 ``[T, n_mfcc]`` and ``T``.

    Args:
        pipeline_file: The model's ``1/dali.py`` (with ``preprocess.json`` beside it).
    """

    input_name = "audio"

    def __init__(self, pipeline_file: Path) -> None:
        super().__init__(pipeline_file, "audio_preprocess")

    @staticmethod
    def _device_kwargs(config: dict[str, Any]) -> dict[str, Any]:
        return {"device": config["device"]}

    def _make_check(self, config: dict[str, Any]) -> Callable[[np.ndarray], Any]:
        return partial(check_audio, max_bytes=config["max_bytes"], max_seconds=config["max_seconds"], name="audio")

    def _sniff(self, payload: np.ndarray) -> str | None:
        return sniff_audio(np.asarray(payload, dtype=np.uint8).tobytes()[:16])

    def _after(self, outputs: tuple[np.ndarray, ...], info: Any) -> tuple[np.ndarray, ...]:
        # The header's frame count is trusted only this far: the decoded length is the real limit.
        frames = int(outputs[1].reshape(-1)[0])
        if frames > self.config["max_frames"]:
            raise InputError(
                "audio",
                f"decoded audio gives {frames} MFCC frames, over the limit of {self.config['max_frames']} "
                f"({self.config['max_seconds']:g} s)",
            )
        return outputs
