"""Qwen2.5-Omni image preprocessing with DALI, equal to its Hugging Face processor (Qwen2-VL's).

The processor (``shared/reference/qwen2.5-omni-facts.md`` §3) resizes every image to its own
size, a multiple of 28 on each side chosen by :func:`smart_resize` within a pixel budget;
resizes with antialiased bicubic to uint8; normalizes with CLIP's mean and std; and cuts the
result into 14x14 patches, each image repeated twice in time, grouped 2x2 for the merger:
``pixel_values`` ``[grid_h * grid_w, 3 * 2 * 14 * 14]`` and ``image_grid_thw`` ``[1, grid_h, grid_w]``.

DALI decodes (JPEG with libjpeg's fancy chroma upsampling, as PIL does: DALI's default is
off), resizes each sample to the size :func:`smart_resize` computed from its header, and
normalizes; :func:`patch_rows` lays the patches out. The same pipeline runs on the GPU
(``device_id`` set, ``decoder_device="mixed"``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmtriton.contract import InputError

#: The processor's constants (Qwen2-VL image processor, the checkpoint's preprocessor_config.json).
PATCH = 14
MERGE = 2
TEMPORAL = 2
FACTOR = PATCH * MERGE
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """The size the processor resizes a ``height`` x ``width`` image to: multiples of ``factor``, in the pixel budget.

    Each side is rounded to the nearest multiple of ``factor`` (half to even); when that is
    over ``max_pixels`` both sides shrink by the same factor (rounded down, at least
    ``factor``), when under ``min_pixels`` both grow (rounded up).

    Raises:
        InputError: An aspect ratio over 200:1, which the processor refuses too.
    """
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InputError(
            "image",
            f"image of {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}:1, which this model's processor refuses",
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def patch_rows(chw: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalized ``[3, H, W]`` pixels as the processor's patch rows and their grid.

    Rows are 2x2 merge blocks in raster order, the 4 patches of a block in raster order;
    a row holds ``[channel][time][y][x]`` with the image repeated in time.

    Returns:
        ``pixel_values`` ``[grid_h * grid_w, 3 * 2 * 14 * 14]`` float32 and ``(1, grid_h, grid_w)``.
    """
    channels, height, width = chw.shape
    gh, gw = height // PATCH, width // PATCH
    frames = np.broadcast_to(chw, (TEMPORAL, channels, height, width))
    blocks = frames.reshape(TEMPORAL, channels, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # -> (block row, block col, patch row in block, patch col in block, channel, time, y, x)
    rows = blocks.transpose(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, channels * TEMPORAL * PATCH * PATCH)
    return np.ascontiguousarray(rows, dtype=np.float32), (1, gh, gw)


#: EXIF orientations that turn the image by 90 or 270 degrees (width and height trade places).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def displayed_size(payload: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image as shown, after its EXIF orientation.

    DALI's decoder applies the orientation (as the processor's loader does), so this, not
    the stored size, is what :func:`smart_resize` must be given. Reads the header only.
    """
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


@dataclass(frozen=True)
class ImageSettings:
    """The processor settings the pipeline follows (from the checkpoint's ``preprocessor_config.json``)."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def has_alpha(payload: bytes) -> bool:
    """Whether an encoded image carries transparency (an alpha band, or a PNG/GIF transparency entry); header only."""
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as img:
        return "A" in img.getbands() or img.info.get("transparency") is not None


def composite_on_white(payload: bytes) -> np.ndarray:
    """An image with transparency as the processor sees it: decoded, oriented, composited on white, ``[H, W, 3]`` uint8.

    DALI's decoder drops the alpha channel, so these (mostly small PNG screenshots and
    icons) are decoded on the CPU; resizing and normalizing stay in the pipeline.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(payload)) as img:
        rgba = ImageOps.exif_transpose(img).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def build_pipeline(
    settings: ImageSettings, *, batch_size: int, num_threads: int = 2, device_id: int | None = None, decoded: bool = False
) -> object:
    """The DALI pipeline: images and per-sample target sizes in, normalized CHW float32 out.

    Inputs (external sources): ``image`` (encoded bytes; with ``decoded``, ``[H, W, 3]`` uint8
    pixels, see :func:`composite_on_white`), ``height`` and ``width`` (float32 scalars, the
    :func:`smart_resize` size of each sample).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    decoder_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_async=False, exec_pipelined=False)
    def qwen_image() -> object:
        height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
        width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
        if decoded:
            pixels = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
            if device_id is not None:
                pixels = pixels.gpu()
        else:
            encoded = fn.external_source(name="image", dtype=types.UINT8, ndim=1)
            pixels = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB, jpeg_fancy_upsampling=True)
        resized = fn.resize(pixels, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(
            resized,
            mean=[255.0 * m for m in settings.mean],
            std=[255.0 * s for s in settings.std],
            dtype=types.FLOAT,
            output_layout="CHW",
        )

    pipe = qwen_image()
    pipe.build()
    return pipe


class ImagePipelines:
    """The two pipelines one batch may need: encoded images, and images with transparency composited first.

    Args:
        settings: The processor settings.
        batch_size: Largest batch.
        device_id: None for the CPU, else the GPU.
    """

    def __init__(self, settings: ImageSettings, *, batch_size: int, device_id: int | None = None) -> None:
        self.settings = settings
        self.encoded = build_pipeline(settings, batch_size=batch_size, device_id=device_id)
        self.decoded = build_pipeline(settings, batch_size=batch_size, device_id=device_id, decoded=True)

    def __call__(self, payloads: Sequence[bytes]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """Per image, its patch rows and grid (the processor's ``pixel_values`` and ``image_grid_thw``)."""
        results: list[tuple[np.ndarray, tuple[int, int, int]] | None] = [None] * len(payloads)
        alpha = [i for i, p in enumerate(payloads) if has_alpha(p)]
        plain = [i for i in range(len(payloads)) if i not in set(alpha)]
        for indices, pipe, inputs in (
            (plain, self.encoded, [np.frombuffer(payloads[i], dtype=np.uint8) for i in plain]),
            (alpha, self.decoded, [composite_on_white(payloads[i]) for i in alpha]),
        ):
            if indices:
                sizes = [displayed_size(payloads[i]) for i in indices]
                for i, out in zip(indices, _run(pipe, inputs, sizes, self.settings)):
                    results[i] = out
        return [r for r in results if r is not None]


def _run(pipe: object, inputs: list[np.ndarray], sizes: Sequence[tuple[int, int]], settings: ImageSettings) -> list:
    targets = [smart_resize(h, w, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels) for h, w in sizes]
    pipe.feed_input("image", inputs)
    pipe.feed_input("height", [np.float32(h) for h, _ in targets])
    pipe.feed_input("width", [np.float32(w) for _, w in targets])
    (out,) = pipe.run()
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    return [patch_rows(np.array(out.at(i))) for i in range(len(inputs))]


def preprocess_images(
    pipe: object, payloads: Sequence[bytes], sizes: Sequence[tuple[int, int]], settings: ImageSettings
) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Run a batch of images without transparency through the encoded-image pipeline.

    Args:
        pipe: From :func:`build_pipeline` (its batch size at least ``len(payloads)``).
        payloads: Encoded images.
        sizes: Each image's ``(height, width)`` as shown (:func:`displayed_size`).
        settings: The processor settings.
    """
    return _run(pipe, [np.frombuffer(p, dtype=np.uint8) for p in payloads], sizes, settings)
