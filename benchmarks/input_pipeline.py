"""Training input pipeline: throughput and peak memory, ours against ``image_dataset_from_directory``.

    python -m benchmarks.input_pipeline [--sizes 2000 20000] [--epochs 2] [--runs 1] [--side 128]

The same RGB JPEG folders (``benchmarks.image_folder``: mixed sizes from 64 to 800 pixels a side,
made once under ``.cache/bench-images`` and reused; the smaller folder is hard links to the first
files of the larger) are read by

* ours: ``data.scan_images`` + ``training.make_dataset`` with a ``training.PixelCache`` (what
  ``training.train`` feeds ``model.fit``): shuffled, decoded by the serving decoder to
  ``side x side x 3`` float32 in [0, 1], batches of 32;
* the baseline: ``keras.utils.image_dataset_from_directory(image_size=(side, side),
  batch_size=32, shuffle=True)`` (TensorFlow's own JPEG decoder and bilinear resize).

Three more pipelines answer "what bounds the first epoch" (``--pipelines ... tf-native
tf-native-generator tf-native-cache``); none is what training uses:

* ``tf-native``: the same shuffled file indices, batched, decoded by a TensorFlow graph in a
  parallel ``tf.data`` map (libjpeg DCT scaling to at least the target, bilinear resize, rounded
  to uint8, as ``tf_pixels`` below), no Python stage and no disk cache;
* ``tf-native-generator``: the same, but the index batches come from ``from_generator``, the one
  Python stage a disk cache of decoded pixels needs.  Under op determinism tf.data rewrites every
  parallel map of a pipeline that holds a stateful op (a Python function, a variable) into a
  sequential one; the child reports whether that rewrite happened (TensorFlow logs it);
* ``tf-native-cache``: ``tf-native`` with tf.data's own disk cache (``Dataset.cache(file)``, a
  dataset op, so no rewrite) after the decode: what a TensorFlow-only disk cache costs on the
  first pass and saves on the next (its epoch 2 replays epoch 1's order instead of reshuffling,
  which can only flatter it).

All run under TensorFlow's op determinism, which ``training.train`` enables before it builds
the pipeline.  Throughput is images per second while iterating the dataset for one epoch (every batch
materialised, no model), per epoch: epoch 1 decodes every file for all; from epoch 2 on ours
reads the decoded pixels back from its disk cache while the baseline decodes again.  Each
(pipeline, size, run) is its own fresh interpreter; its peak RSS is the child's ``ru_maxrss``
from ``os.wait4`` in the parent, so the runs do not pollute each other.  "RSS after imports" is
the child's RSS before it lists the folder; the pipeline's own cost is the difference.  On a
shared machine wall-clock rates swing with the other load; CPU time per image (all threads of
the child, ``time.process_time``) is printed too, as the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import image_folder
from benchmarks._common import ROOT

BATCH = 32
SEED = 42
PIPELINES = ("baseline", "ours", "tf-native", "tf-native-generator", "tf-native-cache")
DEFAULT_PIPELINES = ("baseline", "ours")


def tf_pixels(data, side: int):
    """Encoded JPEG bytes (scalar string tensor) -> uint8 ``(side, side, 3)``: DCT-scaled decode
    (the largest 1/2, 1/4 or 1/8 that keeps both sides at or above ``side``), bilinear resize."""
    import functools

    import tensorflow as tf

    shape = tf.io.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0] // side, shape[1] // side)
    decoded = tf.case(
        [(fits >= r, functools.partial(tf.io.decode_jpeg, data, channels=3, ratio=r)) for r in (8, 4, 2)],
        default=functools.partial(tf.io.decode_jpeg, data, channels=3),
    )
    return tf.cast(tf.clip_by_value(tf.round(tf.image.resize(decoded, (side, side))), 0.0, 255.0), tf.uint8)


def tf_native(files: list[str], labels: list[int], side: int, python_source: bool, cache_file: str | None):
    """``tf-native``, ``tf-native-generator`` (``python_source``) or ``tf-native-cache``
    (``cache_file``): see the module docstring."""
    import numpy as np
    import tensorflow as tf

    from gitops_ml import images, training

    n = len(files)
    if python_source:
        rng = np.random.default_rng(SEED)

        def index_batches():
            order = rng.permutation(n)
            for start in range(0, n, BATCH):
                yield order[start : start + BATCH]

        ds = tf.data.Dataset.from_generator(index_batches, output_signature=tf.TensorSpec((None,), tf.int64))
    else:
        ds = tf.data.Dataset.range(n).shuffle(n, seed=SEED, reshuffle_each_iteration=True).batch(BATCH)
    paths = tf.constant(files)
    all_labels = tf.constant(np.asarray(labels, np.int64))
    pixel_spec = tf.TensorSpec((side, side, 3), tf.uint8)

    def decode(chunk):
        x = tf.map_fn(
            lambda p: tf_pixels(tf.io.read_file(p), side), tf.gather(paths, chunk), fn_output_signature=pixel_spec
        )
        return x, tf.gather(all_labels, chunk)

    ds = ds.map(decode, num_parallel_calls=training.PARALLEL_BATCHES, deterministic=True)
    if cache_file:
        ds = ds.cache(cache_file)  # uint8, as ours caches
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / images.PIXEL_MAX, y))
    return training.fixed_buffers(ds.prefetch(training.PREFETCH_BATCHES))


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def child(pipeline: str, folder: Path, epochs: int, side: int) -> dict:
    """One measurement in this (fresh) process: build the dataset, iterate ``epochs`` epochs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from gitops_ml import data, params, training

    # As in training.train, for both: the global op determinism it enables (under which a tf.data
    # map over a Python function runs serially) is part of what the model's input pipeline meets.
    tf.config.experimental.enable_op_determinism()
    rss_after_imports = _rss_kib()
    started = time.perf_counter()
    cache, cache_dir = None, None
    if pipeline == "ours":
        index = data.scan_images(folder, "images")
        p = params.validate(
            {
                "image": {"height": side, "width": side, "channels": 3},
                "train": {"epochs": epochs, "batch_size": BATCH, "learning_rate": 0.001, "seed": SEED},
            }
        )
        cache_dir = tempfile.mkdtemp(prefix="pixel-cache-", dir=folder.parent)
        cache = training.PixelCache(index.files, training.input_shape(p), cache_dir)
        ds = training.make_dataset(index.files, index.labels, p, shuffle=True, cache=cache)
    elif pipeline.startswith("tf-native"):
        index = data.scan_images(folder, "images")
        if pipeline == "tf-native-cache":
            cache_dir = tempfile.mkdtemp(prefix="tf-cache-", dir=folder.parent)
        ds = tf_native(
            index.files,
            index.labels,
            side,
            python_source=pipeline == "tf-native-generator",
            cache_file=os.path.join(cache_dir, "pixels") if cache_dir else None,
        )
    else:
        ds = keras.utils.image_dataset_from_directory(
            folder, image_size=(side, side), batch_size=BATCH, shuffle=True, seed=SEED, verbose=False
        )
    build_seconds = time.perf_counter() - started
    per_epoch = []
    for _ in range(epochs):
        started, cpu_started, seen = time.perf_counter(), time.process_time(), 0
        for x, _labels in ds:
            seen += int(x.shape[0])
        per_epoch.append(
            {"images": seen, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}
        )
    result = {"build_seconds": build_seconds, "epochs": per_epoch, "rss_after_imports_kib": rss_after_imports}
    if cache is not None:
        result["cache_disk_bytes"] = cache.disk_bytes()
        cache.close()
    if cache_dir:
        shutil.rmtree(cache_dir)
    return result


def measure(pipeline: str, folder: Path, epochs: int, side: int) -> dict:
    """Run ``child`` in a fresh interpreter; add its peak RSS as the kernel counted it."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.input_pipeline",
        "--child",
        pipeline,
        "--folder",
        str(folder),
        "--epochs",
        str(epochs),
        "--side",
        str(side),
    ]
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        stderr.seek(0)
        # TensorFlow's log line when tf.data turned a parallel map into a sequential one
        serialised = "use_unbounded_threadpool" in stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{pipeline} on {folder} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_kib"] = usage.ru_maxrss  # Linux: KiB
    result["parallel_map_made_sequential"] = serialised
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(DEFAULT_PIPELINES))
    parser.add_argument("--child", choices=PIPELINES)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.epochs, args.side)))
        return

    for size in sorted(args.sizes, reverse=True):  # the largest first: the smaller ones are links into it
        image_folder.folder(size)
    rows = {}
    for size in args.sizes:
        folder = image_folder.folder(size)
        for run in range(args.runs):
            for pipeline in args.pipelines if run % 2 == 0 else args.pipelines[::-1]:
                result = measure(pipeline, folder, args.epochs, args.side)
                rows.setdefault((size, pipeline), []).append(result)
                rates = ", ".join(
                    f"{e['images'] / e['seconds']:.0f} ({e['cpu_seconds'] / e['images'] * 1000:.2f} CPU ms/image)"
                    for e in result["epochs"]
                )
                print(
                    f"{size:>6} {pipeline:<8} run {run + 1}: images/s per epoch {rates}; "
                    f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB"
                    + ("; tf.data made its parallel map sequential" if result["parallel_map_made_sequential"] else ""),
                    flush=True,
                )

    def median_rate(size, pipeline, epoch):
        return statistics.median(
            r["epochs"][epoch]["images"] / r["epochs"][epoch]["seconds"] for r in rows[(size, pipeline)]
        )

    def median_cpu_ms(size, pipeline, epoch):
        return statistics.median(
            r["epochs"][epoch]["cpu_seconds"] / r["epochs"][epoch]["images"] * 1000 for r in rows[(size, pipeline)]
        )

    def median_mib(size, pipeline, key):
        return statistics.median(r[key] for r in rows[(size, pipeline)]) / 1024

    print(f"\n{args.side}x{args.side} RGB, batch {BATCH}, {args.epochs} epochs, median of {args.runs} run(s)")
    epochs = " | ".join(f"epoch {e + 1} images/s (CPU ms/image)" for e in range(args.epochs))
    header = f"| images | pipeline | build s | {epochs} | peak RSS MiB | RSS after imports MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.sizes:
        for pipeline in args.pipelines:
            build = statistics.median(r["build_seconds"] for r in rows[(size, pipeline)])
            rates = " | ".join(
                f"{median_rate(size, pipeline, e):.0f} ({median_cpu_ms(size, pipeline, e):.2f})"
                for e in range(args.epochs)
            )
            print(
                f"| {size:,} | {pipeline} | {build:.1f} | {rates} | "
                f"{median_mib(size, pipeline, 'peak_rss_kib'):.0f} | "
                f"{median_mib(size, pipeline, 'rss_after_imports_kib'):.0f} |"
            )
        if "baseline" not in args.pipelines:
            continue
        for pipeline in (p for p in args.pipelines if p != "baseline"):
            ratios = " | ".join(
                f"{median_rate(size, pipeline, e) / median_rate(size, 'baseline', e):.2f}x "
                f"({median_cpu_ms(size, pipeline, e) / median_cpu_ms(size, 'baseline', e):.2f}x)"
                for e in range(args.epochs)
            )
            rss = median_mib(size, pipeline, "peak_rss_kib") / median_mib(size, "baseline", "peak_rss_kib")
            print(f"| {size:,} | ratio {pipeline}/baseline | | {ratios} | {rss:.2f} | |")
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        for pipeline in args.pipelines:
            grown = median_mib(large, pipeline, "peak_rss_kib") - median_mib(small, pipeline, "peak_rss_kib")
            print(f"{pipeline}: peak RSS at {large:,} minus at {small:,} images: {grown:+.0f} MiB")


if __name__ == "__main__":
    main()
