"""ADM/DiT image preprocessing (``center_crop_arr``): the PIL reference and its geometry.

To a ``resolution`` r: while the short side is at least 2r, halve the image with a box filter
(sizes floored); then resize bicubically so the short side is r (the long side rounded); then
cut the centered r x r square (offsets floored). The DALI pipeline in ``dali_preprocess``
reproduces this; the PIL version here is the reference it is measured against.

Images become 8-bit RGB before resizing; 16-bit grayscale is scaled from its full range (see
:func:`to_rgb`). Decoder errors are reported with :func:`error_text`, which is stable across runs.
"""

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class ResizePlan:
    halvings: int  # number of 2:1 box steps
    resized: tuple  # (width, height) after the bicubic step
    crop: tuple  # (top, left) of the r x r crop


def plan_resize(width, height, resolution):
    """Geometry of ``center_crop_arr`` for a ``width`` x ``height`` image."""
    halvings = 0
    while min(width, height) >= 2 * resolution:
        width, height, halvings = width // 2, height // 2, halvings + 1
    scale = resolution / min(width, height)
    w, h = round(width * scale), round(height * scale)
    return ResizePlan(halvings, (w, h), ((h - resolution) // 2, (w - resolution) // 2))


def center_crop_arr(image, resolution):
    """PIL image -> centered ``(resolution, resolution, channels)`` uint8 array, ADM style."""
    plan = plan_resize(*image.size, resolution)
    for _ in range(plan.halvings):
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    image = image.resize(plan.resized, resample=Image.BICUBIC)
    top, left = plan.crop
    return np.array(np.asarray(image)[top:top + resolution, left:left + resolution])  # writable copy


def probe_image(data):
    """Read only the header of encoded image bytes -> ``(format, mode, (width, height))``."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.mode, image.size


def to_rgb(image):
    """PIL image -> RGB, scaling 16-bit grayscale (modes ``I;16*``, and ``I`` as older PIL decodes such
    PNGs) from 0..65535 to 0..255. ``convert("RGB")`` alone clips those values, leaving them nearly white."""
    if image.mode in _WIDE_GRAY:
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535), mode L
    return image.convert("RGB")


def pil_preprocess(data, resolution):
    """Encoded image bytes -> ``(resolution, resolution, 3)`` uint8 RGB (raises if undecodable)."""
    with Image.open(io.BytesIO(data)) as image:
        return center_crop_arr(to_rgb(image), resolution)


def error_text(error):
    """An exception as stable text: its message without object reprs (PIL names the stream it could
    not identify, ``<_io.BytesIO object at 0x7f...>``), or its type name when the message is empty."""
    return _OBJECT_REPR.sub("", str(error)).strip() or type(error).__name__
