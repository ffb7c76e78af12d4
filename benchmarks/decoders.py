"""What one decoded image costs, by decoder and by how it is called: the serving side of the
"one decoder for training and serving" trade-off.

    python -m benchmarks.decoders [--images 800] [--seconds 2]

* ``pillow``: ``images.decode_pixels``, the decoder training and serving share today (Pillow:
  draft for a JPEG, antialiased bilinear resize), one image per call;
* ``tensorflow x1``: a TensorFlow graph decoder (``benchmarks.input_pipeline.tf_pixels`` for a
  JPEG, ``decode_png`` + bilinear resize for a PNG) traced once, one image per call: what a
  model server pays per single-image request if serving used TensorFlow's decoder;
* ``tensorflow eager x1``: the same ops run eagerly, one image per call (no traced function: the
  cheapest way to call TensorFlow for one image);
* ``tensorflow x32``: the same graph over 32 images per call (``tf.map_fn``), what a batched
  request or a training batch pays.

Then one single-image ``/predict`` request's CPU work, decode and model, with the demo's built-in
CNN (untrained, 8x8x1, 10 classes) exported and loaded as the server does
(``training.export_serving`` / ``load_serving``): Pillow's decode then the traced model call (what
the server does today) against one traced call that decodes with TensorFlow and runs the loaded
model in the same graph (what serving with a TensorFlow decoder would do at best).

Two inputs: the benchmark's RGB JPEGs of mixed sizes (``benchmarks.image_folder``, first
``--images`` of the 2,000 folder) decoded to 128x128x3, and the demo's 8x8 grey digit PNGs
decoded to 8x8x1 (what the serving benchmark sends).  All in one process, one after the other;
CPU microseconds per image from ``time.process_time`` (all threads).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks import image_folder
from benchmarks._common import begin


def per_image_cpu_us(call, batches: list, per_call: int, seconds: float) -> float:
    call(batches[0])  # trace / warm up
    started, cpu, images = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - started < seconds:
        for batch in batches:
            call(batch)
            images += per_call
    return (time.process_time() - cpu) / images * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    begin("decoders")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from benchmarks.input_pipeline import tf_pixels
    from gitops_ml import data, demo

    jpegs = [Path(f).read_bytes() for f in data.scan_images(image_folder.folder(2000), "images").files[: args.images]]
    with tempfile.TemporaryDirectory() as tmp:
        demo.write_digits(Path(tmp) / "images")
        pngs = [Path(f).read_bytes() for f in data.scan_images(Path(tmp) / "images").files[: args.images]]

    def tf_png(encoded, side, channels):
        resized = tf.image.resize(tf.io.decode_png(encoded, channels=channels), (side, side))
        return tf.cast(tf.round(resized), tf.uint8)

    cases = [
        ("RGB JPEG, mixed sizes -> 128x128x3", jpegs, 128, 3, lambda d: tf_pixels(d, 128)),
        ("grey digit PNG 8x8 -> 8x8x1", pngs, 8, 1, lambda d: tf_png(d, 8, 1)),
    ]
    print("| input | pillow x1 | tensorflow x1 | tensorflow eager x1 | tensorflow x32 | (CPU us per image) |")
    print("|---|---|---|---|---|---|")
    for label, blobs, side, channels, graph in cases:
        pillow, single, eager, batched = measure_case(blobs, side, channels, graph, args.seconds)
        print(
            f"| {label} | {pillow:.0f} | {single:.0f} ({single / pillow:.1f}x) | {eager:.0f} ({eager / pillow:.1f}x) | "
            f"{batched:.0f} ({batched / pillow:.1f}x) | |"
        )
    today, fused = request_cpu_us(pngs, lambda d: tf_png(d, 8, 1), args.seconds)
    print("\n| one digit /predict request, decode + model | CPU us |")
    print("|---|---|")
    print(f"| Pillow decode, then the traced model call (today) | {today:.0f} |")
    print(f"| TensorFlow decode and the model in one traced call | {fused:.0f} ({fused / today:.2f}x) |")


def request_cpu_us(pngs: list[bytes], graph, seconds: float) -> tuple[float, float]:
    """CPU us per single-image request: today's decode-then-predict, and decode fused with the model."""
    import numpy as np
    import tensorflow as tf

    from gitops_ml import demo, images, params, training

    p = params.validate(demo.DEMO_PARAMS)
    model = training.build_model(10, p)
    with tempfile.TemporaryDirectory() as tmp:
        training.export_serving(model, Path(tmp) / "model", np.zeros((2, 8, 8, 1), np.float32))
        predict = training.load_serving(Path(tmp) / "model")
    loaded = predict.artifact
    spec = tf.TensorSpec((8, 8, 1), tf.uint8)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string)])
    def fused(blobs):
        pixels = tf.map_fn(graph, blobs, fn_output_signature=spec)
        return loaded.serve(tf.cast(pixels, tf.float32) / images.PIXEL_MAX)

    def today(b):
        return predict(images.to_model_input(images.decode_pixels(b, 8, 8, 1))[np.newaxis])

    def fused_request(b):
        out = fused(tf.constant([b]))
        if isinstance(out, dict):  # as ``load_serving`` does
            (out,) = out.values()
        return out.numpy()

    return per_image_cpu_us(today, pngs, 1, seconds), per_image_cpu_us(fused_request, pngs, 1, seconds)


def measure_case(blobs: list[bytes], side: int, channels: int, graph, seconds: float):
    """CPU us per image: Pillow one per call, the TensorFlow graph one per call (traced and eager)
    and 32 per call."""
    import tensorflow as tf

    from gitops_ml import images

    pillow = per_image_cpu_us(lambda b: images.decode_pixels(b, side, side, channels), blobs, 1, seconds)
    one = tf.function(graph, input_signature=[tf.TensorSpec((), tf.string)])
    single = per_image_cpu_us(lambda b: one(b).numpy(), blobs, 1, seconds)
    eager = per_image_cpu_us(lambda b: graph(tf.constant(b)).numpy(), blobs, 1, seconds)
    spec = tf.TensorSpec((side, side, channels), tf.uint8)
    many = tf.function(
        lambda b: tf.map_fn(graph, b, fn_output_signature=spec), input_signature=[tf.TensorSpec((None,), tf.string)]
    )
    groups = [tf.constant(blobs[i : i + 32]) for i in range(0, len(blobs) - 31, 32)]
    batched = per_image_cpu_us(lambda b: many(b).numpy(), groups, 32, seconds)
    return pillow, single, eager, batched


if __name__ == "__main__":
    main()
