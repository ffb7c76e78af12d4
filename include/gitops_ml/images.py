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


def decode_pixels(data: bytes, height: int, width: int, channels: int, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/GIF/BMP bytes to ``uint8`` pixels ``(height, width, channels)``.

    A JPEG larger than the target is decoded at a reduced scale (libjpeg's DCT scaling,
    Pillow's ``draft``) before the resize: about twice as fast, and the same for training
    and serving.  The pixel limit is checked on the full size before anything is decoded.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not data:
        raise ImageDecodeError(f"{name} is empty")
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"{name} is {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS}")
            if img.format == "JPEG":
                img.draft(mode, (width, height))
            converted = img.convert(mode) if img.mode != mode else img  # a JPEG in draft mode is `mode` already
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name} is not a decodable image: {exc}") from None
    return pixels[..., np.newaxis] if channels == 1 else pixels


# The model's input is ``float32`` pixels divided by this (training's tf.data pipeline divides by it too).
PIXEL_MAX = 255.0


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """``uint8`` pixels (one image or a batch) -> the model's ``float32`` input in [0, 1]."""
    return np.asarray(pixels, dtype=np.float32) / np.float32(PIXEL_MAX)


def decode(data: bytes, height: int, width: int, channels: int, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/GIF/BMP bytes to a ``float32`` array ``(height, width, channels)`` in [0, 1]."""
    return to_model_input(decode_pixels(data, height, width, channels, name))


def read_pixels(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """``decode_pixels`` of a file; errors name the file."""
    with open(path, "rb") as fh:
        return decode_pixels(fh.read(), height, width, channels, name=path)


def decode_file(path: str, height: int, width: int, channels: int) -> np.ndarray:
    return to_model_input(read_pixels(path, height, width, channels))
