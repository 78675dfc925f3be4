"""Qwen2.5-Omni image preprocessing with DALI against its Hugging Face processor (Qwen2-VL's, PIL backend here).

The reference is transformers' own ``Qwen2VLImageProcessorPil`` with the checkpoint's pixel
bounds, on the PIL-decoded image. The grid and the row layout must be exact; pixel values
agree within mean |diff| < 0.01 and max |diff| < 0.35 in normalized units (one uint8 level
is about 0.015): the two bicubic resizers (PIL's and DALI's antialiased cubic) round a few
pixels differently. Measured: mean 0.003 (0.006 on a 9x13 image), max 0.04-0.27.
Images with transparency are composited on white first, as the processor does
(:class:`ImagePipelines` routes them; DALI's decoder would drop the alpha channel).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmtriton.contract import InputError
from mmtriton.media.qwen2_5_omni.image import (
    ImagePipelines,
    ImageSettings,
    build_pipeline,
    displayed_size,
    patch_rows,
    preprocess_images,
    smart_resize,
)

SETTINGS = ImageSettings()


@pytest.fixture(scope="module")
def reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=SETTINGS.min_pixels, max_pixels=SETTINGS.max_pixels)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(SETTINGS, batch_size=4)


def _image(width: int, height: int, fmt: str, seed: int = 0, subsampling: str = "4:2:0") -> bytes:
    """A gradient with noise and edges (what a resizer can get wrong), encoded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), ((xx // 8 + yy // 8) % 2) * 200], -1)
    x = np.clip(x + rng.integers(-20, 20, x.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    options = {"quality": 90, "subsampling": subsampling} if fmt == "JPEG" else {}
    Image.fromarray(x).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_smart_resize_equals_the_processors() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    rng = np.random.default_rng(1)
    shapes = [(300, 500), (1080, 1920), (20, 20), (2400, 1080), (1600, 720), (14, 14), (1, 150), (28, 5600)]
    shapes += [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(300)]
    shapes = [(h, w) for h, w in shapes if max(h, w) <= 200 * min(h, w)]
    for h, w in shapes:
        assert smart_resize(h, w, min_pixels=3136, max_pixels=12845056) == theirs(h, w, 28, 3136, 12845056), (h, w)
    assert smart_resize(300, 500, min_pixels=3136, max_pixels=12845056) == (308, 504)
    with pytest.raises(InputError, match=r"^input 'image': image of 201x1 has an aspect ratio over 200:1"):
        smart_resize(1, 201, min_pixels=3136, max_pixels=12845056)


@pytest.mark.parametrize(
    ("width", "height", "fmt"),
    [
        (1080, 2400, "JPEG"),  # tall phone screenshot, 4:2:0
        (720, 1600, "JPEG"),
        (1280, 960, "JPEG"),  # landscape photo
        (500, 300, "PNG"),
        (20, 20, "PNG"),  # grown to the minimum
    ],
)
def test_dali_rows_equal_the_processor(pipe, reference, width: int, height: int, fmt: str) -> None:
    data = _image(width, height, fmt)
    ((rows, grid),) = preprocess_images(pipe, [data], [(height, width)], SETTINGS)
    ref = reference(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    assert rows.shape == ref["pixel_values"].shape
    diff = np.abs(rows - ref["pixel_values"])
    assert diff.mean() < 0.01 and diff.max() < 0.35, (diff.mean(), diff.max())


def test_a_batch_of_different_sizes_keeps_each_its_own(pipe) -> None:
    payloads = [_image(500, 300, "JPEG", seed=i) for i in range(2)] + [_image(720, 1600, "JPEG", seed=5)]
    sizes = [(300, 500), (300, 500), (1600, 720)]
    batch = preprocess_images(pipe, payloads, sizes, SETTINGS)
    alone = [preprocess_images(pipe, [p], [s], SETTINGS)[0] for p, s in zip(payloads, sizes)]
    for (rows, grid), (want, want_grid) in zip(batch, alone):
        assert grid == want_grid
        np.testing.assert_array_equal(rows, want)


def test_patch_rows_layout() -> None:
    """Row r of a 2x2 block grid: block (r // 4) in raster order, patch (r % 4) in raster order inside it;
    inside a row [channel][time][y][x] with both times equal."""
    chw = np.arange(3 * 56 * 28, dtype=np.float32).reshape(3, 56, 28)
    rows, grid = patch_rows(chw)
    assert grid == (1, 4, 2) and rows.shape == (8, 3 * 2 * 14 * 14)
    row = rows[5].reshape(3, 2, 14, 14)  # block 1 (block row 1, col 0), patch 1 (its top right)
    np.testing.assert_array_equal(row[:, 0], chw[:, 28:42, 14:28])
    np.testing.assert_array_equal(row[:, 1], row[:, 0])


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _other_formats() -> dict[str, bytes]:
    base = Image.open(io.BytesIO(_image(400, 300, "PNG", seed=9))).convert("RGB")
    rotated = base.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 300 wide, 400 high
    return {
        "grayscale PNG, odd size": _encode(Image.open(io.BytesIO(_image(333, 517, "PNG", seed=2))).convert("L"), "PNG"),
        "progressive 4:2:0 JPEG": _encode(base.resize((641, 479)), "JPEG", quality=85, progressive=True, subsampling="4:2:0"),
        "4:4:4 JPEG": _encode(base, "JPEG", quality=95, subsampling="4:4:4"),
        "WebP": _encode(base.resize((401, 299)), "WEBP", quality=90),
        "tiny 9x13 PNG": _encode(base.resize((9, 13)), "PNG"),
        "EXIF-rotated JPEG": _encode(rotated, "JPEG", quality=92, exif=exif.tobytes()),
    }


@pytest.mark.parametrize("name", sorted(_other_formats()))
def test_other_real_world_formats_equal_the_processor(pipe, reference, name: str) -> None:
    """As the processor's loader does (PIL, EXIF orientation applied, converted to RGB)."""
    from PIL import ImageOps

    data = _other_formats()[name]
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert displayed_size(data) == (shown.height, shown.width)
    ((rows, grid),) = preprocess_images(pipe, [data], [displayed_size(data)], SETTINGS)
    ref = reference(images=[shown], return_tensors="np")
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    diff = np.abs(rows - ref["pixel_values"])
    assert diff.mean() < 0.01 and diff.max() < 0.35, (diff.mean(), diff.max())


def _alpha_images() -> dict[str, bytes]:
    base = np.asarray(Image.open(io.BytesIO(_image(300, 200, "PNG", seed=4))).convert("RGB"))
    yy, xx = np.mgrid[0:200, 0:300]
    alpha = ((xx // 25 + yy // 25) % 3 * 120).astype(np.uint8)  # opaque, half and fully clear squares
    rgba = Image.fromarray(np.dstack([base, alpha]), "RGBA")
    palette = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "RGBA PNG": _encode(rgba, "PNG"),
        "gray + alpha PNG": _encode(rgba.convert("LA"), "PNG"),
        "palette PNG with a transparent entry": _encode(palette, "PNG", transparency=0),
        "RGBA WebP": _encode(rgba, "WEBP", lossless=True),
    }


@pytest.mark.parametrize("name", sorted(_alpha_images()))
def test_transparency_is_composited_on_white_like_the_processor(reference, name: str) -> None:
    data = _alpha_images()[name]
    pipelines = ImagePipelines(SETTINGS, batch_size=2)
    plain = _image(500, 300, "JPEG", seed=8)
    (rows, grid), (plain_rows, plain_grid) = pipelines([data, plain])  # one batch, both paths
    ref = reference(images=[Image.open(io.BytesIO(data))], return_tensors="np")  # the processor converts itself
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    diff = np.abs(rows - ref["pixel_values"])
    assert diff.mean() < 0.01 and diff.max() < 0.35, (diff.mean(), diff.max())
    plain_ref = reference(images=[Image.open(io.BytesIO(plain)).convert("RGB")], return_tensors="np")
    assert [list(plain_grid)] == plain_ref["image_grid_thw"].tolist()
    assert np.abs(plain_rows - plain_ref["pixel_values"]).mean() < 0.01
