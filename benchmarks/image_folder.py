"""A large RGB JPEG image folder of mixed sizes, made from pictures that installed packages ship.

    python -m benchmarks.image_folder [--count 20000] [--out .cache/bench-images]

Four classes, one per source picture: scikit-learn's ``china.jpg`` and ``flower.jpg``
(``sklearn.datasets.load_sample_images``) and matplotlib's sample ``grace_hopper.jpg`` and
``Minduka_Present_Blue_Pack.png``.  Image ``i`` is a random crop of its class's picture (30 to
100 % of each side), scaled to a random size from 64 to 800 pixels a side, colour-shifted
(a gain and an offset per channel), maybe mirrored, saved as JPEG at quality 70 to 95.  Image
``i`` depends only on ``i`` and the seed, so the first N images of any folder are the same files
and a folder is made once and reused (a ``.complete`` marker records count and seed).  No
download: everything comes from the installed packages.

The layout is ``<out>/n<count>/<class>/<i>.jpg``, the one ``image_dataset_from_directory`` and
``gitops_ml.data.scan_images`` read.  A smaller folder of the same files is made of hard links
into the larger one when it exists (``folder(2000, ...)`` after ``folder(20000, ...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import ROOT

DEFAULT_OUT = ROOT / ".cache" / "bench-images"
SEED = 2026
MIN_SIDE, MAX_SIDE = 64, 800


def sources() -> dict[str, np.ndarray]:
    """Class name -> RGB pixels of the picture a package ships."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    pictures = {Path(name).stem: pixels for name, pixels in zip(sample.filenames, sample.images, strict=True)}
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with Image.open(sample_data / name) as img:
            pictures[Path(name).stem] = np.asarray(img.convert("RGB"))
    return dict(sorted(pictures.items()))


def make_image(picture: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A random crop, scale, colour shift and mirror of ``picture``; returns the image and a JPEG quality."""
    height, width, _ = picture.shape
    crop_h = int(height * rng.uniform(0.3, 1.0))
    crop_w = int(width * rng.uniform(0.3, 1.0))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = picture[top : top + crop_h, left : left + crop_w].astype(np.float32)
    gain = rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    offset = rng.uniform(-30, 30, size=3).astype(np.float32)
    shifted = np.clip(crop * gain + offset, 0, 255).astype(np.uint8)
    img = Image.fromarray(shifted, "RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    longest = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    scale = longest / max(crop_h, crop_w)
    size = (max(MIN_SIDE, round(crop_w * scale)), max(MIN_SIDE, round(crop_h * scale)))
    return img.resize(size, Image.Resampling.BILINEAR), int(rng.integers(70, 96))


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / ".complete").read_text())
    except (OSError, ValueError):
        return None


def folder(count: int, out: Path = DEFAULT_OUT, log=print) -> Path:
    """``<out>/n<count>``, made if it is not complete yet; returns the folder."""
    target = Path(out) / f"n{count}"
    wanted = {"count": count, "seed": SEED, "min_side": MIN_SIDE, "max_side": MAX_SIDE}
    if _marker(target) == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    bigger = sorted((p for p in Path(out).glob("n*") if p != target), key=lambda p: -len(list(p.glob("*/*.jpg"))))
    donor = next(
        (
            p
            for p in bigger
            if (m := _marker(p))
            and m["seed"] == SEED
            and m["count"] >= count
            and (m["min_side"], m["max_side"]) == (MIN_SIDE, MAX_SIDE)
        ),
        None,
    )
    pictures = sources()
    names = list(pictures)
    started = time.monotonic()
    for i in range(count):
        name = names[i % len(names)]
        path = target / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if donor is not None:
            os.link(donor / name / path.name, path)
            continue
        img, quality = make_image(pictures[name], np.random.default_rng([SEED, i]))
        img.save(path, format="JPEG", quality=quality)
        if (i + 1) % 2000 == 0:
            log(f"  {i + 1}/{count} images ({time.monotonic() - started:.0f} s)")
    (target / ".complete").write_text(json.dumps(wanted))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    made = folder(args.count, args.out)
    files = list(made.glob("*/*.jpg"))
    print(f"{made}: {len(files)} JPEGs, {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
