import io
import re

import numpy as np
import pytest
from PIL import Image

from gitops_ml import images


def encode(array, fmt, mode):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_grey_png_keeps_values_and_adds_channel():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = images.decode(encode(pixels, "PNG", "L"), 8, 8, 1)
    assert out.shape == (8, 8, 1) and out.dtype == np.float32
    assert np.allclose(out[..., 0], pixels / 255.0)


def test_rgb_jpeg_resized_to_grey_and_grey_to_rgb():
    rgb = np.full((30, 20, 3), 200, dtype=np.uint8)
    grey = images.decode(encode(rgb, "JPEG", "RGB"), 8, 8, 1)
    assert grey.shape == (8, 8, 1) and abs(float(grey.mean()) - 200 / 255) < 0.02
    colour = images.decode(encode(rgb[..., 0], "PNG", "L"), 16, 12, 3)
    assert colour.shape == (16, 12, 3)


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "is empty"),
        (b"hello world", "is not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "is not a decodable image"),
    ],
)
def test_bad_bytes_raise_named_error(payload, message):
    with pytest.raises(images.ImageDecodeError, match=f"upload.png {message}"):
        images.decode(payload, 8, 8, 1, name="upload.png")


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO", "WEBP"])
def test_formats_outside_png_jpeg_gif_bmp_are_refused(fmt, tmp_path):
    """Pillow would open about 40 formats; only the four the README lists get parsed (serving and data)."""
    from gitops_ml import data
    from gitops_ml.errors import DataError

    blob = encode(np.full((8, 8, 3), 100, dtype=np.uint8), fmt, "RGB")
    with pytest.raises(images.ImageDecodeError, match="not a decodable image"):
        images.decode(blob, 8, 8, 1, name="upload")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "x.png").write_bytes(blob)  # the right suffix, the wrong format
    with pytest.raises(DataError, match=re.escape("data/images/a/x.png is not a readable image")):
        data.scan_images(tmp_path)
