"""Image preprocessing as one DALI pipeline: decode, resize, center crop, normalize.

The same definition serves every profile. The gpu-trtllm profile's DALI backend
serializes it through ``@autoserialize`` and decodes with nvJPEG (``mixed``); the
python-backend runner of the other profiles builds it on the GPU (gpu-hf, gpu-vllm)
or with ``device_id=None`` and ``decoder_device="cpu"`` (cpu). Constants come from ``preprocess.json`` beside this
file, which ``build_engines`` renders from the model spec.
"""

import json
from pathlib import Path

import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.plugin.triton import autoserialize

CONFIG = json.loads((Path(__file__).with_name("preprocess.json")).read_text())


@autoserialize
@dali.pipeline_def(
    batch_size=CONFIG["max_batch_size"],
    num_threads=CONFIG["num_threads"],
    device_id=CONFIG["device_id"],
)
def image_preprocess(decoder_device: str = CONFIG["decoder_device"]):
    """Encoded bytes (``image``) -> normalized CHW FP16 ``[3, S, S]`` (``pixel_values``)."""
    size = CONFIG["image_size"]
    encoded = fn.external_source(name="image", dtype=types.UINT8, ndim=1, device="cpu")
    # Alpha is dropped and grayscale is replicated: the encoder always sees RGB.
    decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    resized = fn.resize(
        decoded,
        resize_shorter=size,
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    return fn.crop_mirror_normalize(
        resized,
        crop=(size, size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[255.0 * m for m in CONFIG["mean"]],
        std=[255.0 * s for s in CONFIG["std"]],
        dtype=types.FLOAT16,
        output_layout="CHW",
    )
