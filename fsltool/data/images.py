"""Decoding and converting images the same way for every source (and later for prediction)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from fsltool.errors import BadImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def convert_image(
    image: Image.Image, *, channels: int, size: int | None, invert: bool = False, rotation: int = 0, resample: str = "lanczos"
) -> np.ndarray:
    """Return a uint8 (C, H, W) array: ``channels`` 1 (grey) or 3 (RGB), square ``size`` by ``resample`` (a
    ``RESAMPLING`` name: lanczos, antialiased; nearest, every output pixel one input pixel).

    ``rotation`` is counter-clockwise degrees (a multiple of 90, lossless); ``invert`` makes dark ink high.
    16-bit and floating-point images are refused (ValueError): Pillow's conversion to 8 bits clips their values
    rather than scaling them, so a 16-bit scan would silently become an almost white image.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"16-bit or floating-point pixels (mode {image.mode}); convert the images to 8 bits per channel")
    image = image.convert("L" if channels == 1 else "RGB")
    if rotation % 360:
        image = image.rotate(rotation)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), RESAMPLING[resample])
    array = np.asarray(image, dtype=np.uint8)
    if invert:
        array = 255 - array
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def decode_image(
    data: bytes,
    origin: str,
    *,
    channels: int,
    size: int | None,
    invert: bool = False,
    rotation: int = 0,
    resample: str = "lanczos",
) -> np.ndarray:
    """Decode encoded image bytes; a corrupt or empty file raises BadImageError naming ``origin``."""
    if not data:
        raise BadImageError(origin, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return convert_image(image, channels=channels, size=size, invert=invert, rotation=rotation, resample=resample)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(origin, str(error) or type(error).__name__) from None


def read_image_file(path: str, **options: object) -> np.ndarray:
    """Read and decode one image file (see ``decode_image`` for the options)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise BadImageError(path, error.strerror or str(error)) from None
    return decode_image(data, path, **options)  # type: ignore[arg-type]
