"""Image bytes -> model input, the same code for training and serving (no train/serve skew).

Only Pillow and NumPy: decoding validates the bytes, converts grey/colour to the
channel count in ``params.yaml`` and resizes to the configured size.
"""

from __future__ import annotations

import io

import numpy as np

from gitops_ml.errors import InputError

# Refuse decompression bombs well before Pillow's own (much larger) limit.
MAX_PIXELS = 40_000_000
# The formats the README promises; Pillow would otherwise try ~40 (TIFF, PSD, ...), each more parser surface.
FORMATS = ("PNG", "JPEG", "GIF", "BMP")


class ImageDecodeError(InputError):
    """The bytes are not an image Pillow can decode."""


def decode(data: bytes, height: int, width: int, channels: int, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/GIF/BMP bytes to a ``float32`` array ``(height, width, channels)`` in [0, 1]."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not data:
        raise ImageDecodeError(f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"{name} is {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS}")
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name} is not a decodable image: {exc}") from None
    if channels == 1:
        array = array[..., np.newaxis]
    return array


def decode_file(path: str, height: int, width: int, channels: int) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode(fh.read(), height, width, channels, name=path)
