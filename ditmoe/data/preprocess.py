"""ADM/DiT image preprocessing (``center_crop_arr``): the PIL reference and its geometry.

To a ``resolution`` r: while the short side is at least 2r, halve the image with a box filter
(sizes floored); then resize bicubically so the short side is r (the long side rounded); then
cut the centered r x r square (offsets floored). The DALI pipeline in ``dali_preprocess``
reproduces this; the PIL version here is the reference it is measured against.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


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


def pil_preprocess(data, resolution):
    """Encoded image bytes -> ``(resolution, resolution, 3)`` uint8 RGB (raises if undecodable)."""
    with Image.open(io.BytesIO(data)) as image:
        return center_crop_arr(image.convert("RGB"), resolution)
