"""Image grids as PNG."""

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, rows: int, path, scale: int = 4, pad: int = 1):
    """images: (rows*cols, H, W) or (rows*cols, H, W, C) uint8, row-major; nearest-neighbour upscaled."""
    n = len(images)
    cols = n // rows
    if images.ndim == 3:
        images = images[..., None]
    h, w, c = images.shape[1:]
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(rows * cols):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
