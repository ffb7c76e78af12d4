"""TensorFlow / Keras: split, input pipeline, model, training, evaluation, plots.

The only module that imports TensorFlow.  Training is seeded (Python, NumPy,
TensorFlow and the split) so the same commit gives the same model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import hashlib
import io
import itertools
import logging
import os
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gitops_ml import images, model_code
from gitops_ml.data import ImageIndex
from gitops_ml.errors import DownloadRefused, ModelCodeError, ModelCodeTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Indices into an ``ImageIndex``: deterministic for a given index and seed."""

    train: list[int]
    test: list[int]


def split(index: ImageIndex, test_fraction: float) -> Split:
    """Hash-based held-out split: an image is held out iff the hash of its path says so.

    The split does not depend on the seed or on the other files, so the same image stays
    held out across commits and the champion can be scored fairly on the challenger's
    held-out images (it never trained on them unless the data moved).  Every class with
    at least two images keeps one held out.
    """

    def bucket(i: int) -> float:
        rel = os.path.relpath(index.files[i], index.root) if index.root else index.files[i]
        return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    test = {i for i in range(len(index.files)) if bucket(i) < test_fraction}
    for label in range(len(index.class_names)):
        members = [i for i, y in enumerate(index.labels) if y == label]
        if len(members) > 1 and not test.intersection(members):
            test.add(min(members, key=bucket))
        if len(members) > 1 and test.issuperset(members):
            test.discard(max(members, key=bucket))
    return Split(train=[i for i in range(len(index.files)) if i not in test], test=sorted(test))


def input_shape(params: dict) -> tuple[int, int, int]:
    image = params["image"]
    return image["height"], image["width"], image["channels"]


def load_arrays(files: list[str], params: dict) -> np.ndarray:
    """Decode a few files into one array (a model's input example); use ``image_batches`` for many."""
    h, w, c = input_shape(params)
    return np.stack([images.decode_file(f, h, w, c) for f in files]) if files else np.zeros((0, h, w, c), np.float32)


# Batches decoded ahead of the one the model is working on, and batches decoded at the same time.
# The decoding runs in our own threads (Pillow releases the GIL while it decodes and resizes), not in
# a ``tf.data`` parallel map: ``train`` enables TensorFlow's op determinism, under which tf.data runs
# a Python function (``numpy_function``) serially and prefetches nothing, so the model would wait
# for every batch.  Fixed sizes, not autotuned: tf.data's autotuner may grow buffers up to half the
# machine's memory.
PREFETCH_BATCHES = 2
PARALLEL_BATCHES = max(1, len(os.sched_getaffinity(0)))


def max_decoded_ahead(batch_size: int) -> int:
    """Bound on the decoded images the pipeline holds at once, whatever the dataset size: the
    batches decoded ahead or being decoded (``PREFETCH_BATCHES + PARALLEL_BATCHES``) and the one
    the model works on."""
    return (PREFETCH_BATCHES + PARALLEL_BATCHES + 1) * batch_size


class PixelCache:
    """Decoded ``uint8`` pixels of a file list on disk: one fixed-size record per file in one file.

    The first epoch decodes each image and writes its record; later epochs read it back with one
    ``pread`` (no memory mapping: the pages stay in the OS page cache, outside the process).  The
    file is unlinked as soon as it is created, so nothing is left on disk when training ends or
    the process dies; it takes ``len(files) * height * width * channels`` bytes meanwhile.
    """

    def __init__(self, files: list[str], shape: tuple[int, int, int], folder: str | os.PathLike | None):
        self.files = files
        self.shape = shape
        self.record_bytes = int(np.prod(shape))
        fd, path = tempfile.mkstemp(prefix=".decoded-pixels-", dir=folder)
        os.unlink(path)
        self._fd = fd
        self._stored = bytearray(len(files))  # 1 once record i is on disk
        self._finalizer = weakref.finalize(self, os.close, fd)

    def pixels(self, i: int) -> np.ndarray:
        offset = i * self.record_bytes
        if self._stored[i]:
            return np.frombuffer(os.pread(self._fd, self.record_bytes, offset), np.uint8).reshape(self.shape)
        pixels = images.read_pixels(self.files[i], *self.shape)
        os.pwrite(self._fd, pixels.tobytes(), offset)
        self._stored[i] = 1
        return pixels

    def disk_bytes(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        self._finalizer()


def make_dataset(
    files: list[str],
    labels: list[int],
    params: dict,
    shuffle: bool,
    cache: PixelCache | None = None,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """Streaming ``tf.data`` pipeline: shuffle the file order (seeded, anew each epoch), batch, and
    decode a few batches ahead in threads with the serving decoder (``decoded_ahead``).

    Only file indices are shuffled, never images; decoded images alive at once are bounded by
    ``max_decoded_ahead(batch_size)`` whatever the dataset size.
    With a ``PixelCache`` (over the same ``files``) an image is decoded once and read back from
    disk in later epochs; without one every pass decodes (one pass, e.g. evaluation).
    """
    h, w, c = input_shape(params)
    batch_size = batch_size or params["train"]["batch_size"]
    if cache is not None and cache.files is not files:
        raise ValueError("the pixel cache was built for another file list")

    def load_batch(indices: np.ndarray) -> np.ndarray:
        load = cache.pixels if cache is not None else (lambda i: images.read_pixels(files[i], h, w, c))
        return np.stack([load(int(i)) for i in indices])  # uint8: a quarter of the bytes of the model input

    all_labels = np.asarray(labels, np.int64)
    order_rng = np.random.default_rng(params["train"]["seed"]) if shuffle else None  # a reshuffle per epoch

    def epoch() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = order_rng.permutation(len(files)) if order_rng is not None else np.arange(len(files))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk, x in zip(
            chunks, decoded_ahead(load_batch, chunks, PREFETCH_BATCHES + PARALLEL_BATCHES), strict=True
        ):
            yield x, all_labels[chunk]

    ds = tf.data.Dataset.from_generator(
        epoch,
        output_signature=(
            tf.TensorSpec((None, h, w, c), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
        ),
    )
    # ``images.to_model_input`` in TensorFlow's own threads (no GIL, no fresh float array per batch in
    # Python), the same IEEE float32 division: the same values as serving (tested).
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / tf.constant(images.PIXEL_MAX, tf.float32), y))
    return fixed_buffers(ds)


def fixed_buffers(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with no buffer of tf.data's own on top of ours: no injected prefetch, no autotuned sizes."""
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    return ds.with_options(options)


def decoded_ahead(
    load: Callable[[np.ndarray], np.ndarray], chunks: list[np.ndarray], ahead: int
) -> Iterator[np.ndarray]:
    """``load(chunk)`` for each chunk, in order, with at most ``ahead`` chunks decoded (or being
    decoded) in ``PARALLEL_BATCHES`` threads before the consumer asks for them."""
    pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_BATCHES, thread_name_prefix="gitops-ml-decode")
    pending: collections.deque[concurrent.futures.Future[np.ndarray]] = collections.deque()
    upcoming = iter(chunks)
    try:
        for chunk in itertools.islice(upcoming, ahead):
            pending.append(pool.submit(load, chunk))
        while pending:
            batch = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            yield batch
    finally:  # also when the consumer stops early: drop what was not started, do not wait for the rest
        pool.shutdown(wait=False, cancel_futures=True)


def image_batches(files: list[str], params: dict, batch_size: int = 64) -> Iterator[np.ndarray]:
    """The model input of ``files`` in order, ``batch_size`` images at a time (evaluation: bounded memory)."""
    for x, _ in make_dataset(files, [0] * len(files), params, shuffle=False, batch_size=batch_size):
        yield x.numpy()


def build_model(num_classes: int, params: dict) -> keras.Model:
    """The built-in CNN (a repository without model code): small enough for digits, pooled for larger images."""
    h, w, c = input_shape(params)
    layers = [
        keras.Input((h, w, c), name="image"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
    ]
    if min(h, w) >= 16:
        layers += [
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    else:
        layers += [keras.layers.Flatten()]
    layers += [
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(num_classes, activation="softmax", name="probabilities"),
    ]
    return keras.Sequential(layers, name="gitops_ml_cnn")


def compile_if_needed(model: keras.Model, params: dict) -> keras.Model:
    """Compile an uncompiled model: Adam at ``train.learning_rate``, sparse categorical cross-entropy, accuracy."""
    if not getattr(model, "compiled", False):
        model.compile(
            optimizer=keras.optimizers.Adam(params["train"]["learning_rate"]),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def timeout_minutes(params: dict) -> float:
    return float(params["train"].get("timeout_minutes") or model_code.DEFAULT_TIMEOUT_MINUTES)


@contextlib.contextmanager
def _no_get_file() -> Iterator[None]:
    """Keras ``get_file`` (``weights="imagenet"`` and friends) refused: it downloads, or reads an unpinned cache."""
    from keras.src.utils import file_utils  # noqa: PLC0415

    def refused(fname=None, origin=None, *args, **kwargs):
        raise DownloadRefused(f"keras get_file({origin or fname!r}) refused: {model_code.TRACK_WITH_DVC}")

    originals = (keras.utils.get_file, file_utils.get_file)
    keras.utils.get_file = file_utils.get_file = refused
    try:
        yield
    finally:
        keras.utils.get_file, file_utils.get_file = originals


@contextlib.contextmanager
def running_model_code(code: model_code.ModelCode | None, params: dict) -> Iterator[Any]:
    """The guards around everything a commit's model code does (see ``gitops_ml.model_code``):
    a time limit, no network, no Keras downloads, its own modules; yields its module (or ``None``)."""
    what = f"training with {code.origin}" if code else "training"
    with model_code.time_limit(timeout_minutes(params), what), model_code.no_network(), _no_get_file():
        if code is None:
            yield None
        else:
            with model_code.imported(code) as module:
                yield module


def _user_model(module: Any, code: model_code.ModelCode, class_names: list[str], params: dict) -> keras.Model:
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ModelCodeError(
            f"{code.origin}: defines no build_model(input_shape, class_names, params) function "
            "(the model code contract, see the README)"
        )
    try:
        model = build(input_shape(params), list(class_names), copy.deepcopy(params.get("model") or {}))
    except ModelCodeTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code
        raise model_code.describe(exc, code, "calling build_model") from None
    if not isinstance(model, keras.Model):
        raise ModelCodeError(
            f"{code.origin}: build_model returned {type(model).__module__}.{type(model).__qualname__}"
            ", not a keras.Model"
        )
    return model


def _user_augment(module: Any, code: model_code.ModelCode, params: dict) -> keras.Sequential | None:
    augment = getattr(module, "augment", None)
    if augment is None:
        return None
    if not callable(augment):
        raise ModelCodeError(f"{code.origin}: augment must be a function augment(params) -> list of keras layers")
    try:
        layers = augment(copy.deepcopy(params.get("model") or {}))
    except ModelCodeTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code
        raise model_code.describe(exc, code, "calling augment") from None
    if not isinstance(layers, (list, tuple)) or not all(isinstance(layer, keras.layers.Layer) for layer in layers):
        raise ModelCodeError(
            f"{code.origin}: augment returned {type(layers).__name__}, not a list of keras.layers.Layer"
        )
    return keras.Sequential(list(layers), name="augment") if layers else None


def check_output(
    model: keras.Model, sample: np.ndarray, class_names: list[str], code: model_code.ModelCode | None = None
) -> None:
    """The model must map a batch of images to one probability distribution over the classes.

    Served predictions, the gate and the smoke check read the output as probabilities, so a
    model that ends with logits (no softmax) is refused here, before training, rather than
    silently given a softmax: the README says so.
    """
    origin = code.origin if code else "the built-in model"
    try:
        out = model(tf.convert_to_tensor(sample, tf.float32), training=False)
    except ModelCodeTimeout:
        raise
    except Exception as exc:  # noqa: BLE001 - user code (call of a custom layer or model)
        place = model_code.where(exc, code.root) if code else ""
        raise ModelCodeError(
            f"{place or origin}: the model fails on a batch of {len(sample)} images of shape "
            f"{tuple(sample.shape[1:])}: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(out, (dict, list, tuple)):
        raise ModelCodeError(f"{origin}: the model has {len(out)} outputs; it must have one, the class probabilities")
    out = np.asarray(out)
    expected = (len(sample), len(class_names))
    if out.shape != expected:
        raise ModelCodeError(
            f"{origin}: the model's output has shape (batch, {', '.join(map(str, out.shape[1:]))}), "
            f"expected (batch, {len(class_names)}): one probability per class of the data "
            f"({', '.join(class_names[:20])})"
        )
    sums = out.sum(axis=1)
    if not np.all(np.isfinite(out)) or out.min() < -1e-6 or np.max(np.abs(sums - 1.0)) > 1e-3:
        raise ModelCodeError(
            f"{origin}: the model's output is not a probability distribution (values from "
            f"{out.min():.3g} to {out.max():.3g}, rows summing to {sums.min():.3g}..{sums.max():.3g}): "
            'end the model with a softmax (e.g. Dense(len(class_names), activation="softmax")); '
            "gitops-ml does not add one"
        )


def train(
    index: ImageIndex,
    params: dict,
    code: model_code.ModelCode | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[keras.Model, dict[str, list[float]], Split]:
    """Seed everything, split, build (the commit's ``build_model`` or the built-in CNN), check, fit.

    With model code, every call into it runs under ``running_model_code`` and every failure is a
    ``ModelCodeError`` naming the file and line.  Returns the model, the per-epoch history and
    the split used.

    Decoded images are cached on disk in ``cache_dir`` while training runs (default: next to the
    data folder, i.e. in the commit's work tree), never in memory: see ``make_dataset``.
    """
    seed = params["train"]["seed"]
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    parts = split(index, params["train"]["test_fraction"])
    files = [index.files[i] for i in parts.train]
    labels = [index.labels[i] for i in parts.train]
    test_files = [index.files[i] for i in parts.test]
    test_labels = [index.labels[i] for i in parts.test]
    if cache_dir is None and index.root:
        cache_dir = Path(index.root).parent
    shape = input_shape(params)
    train_cache, test_cache = PixelCache(files, shape, cache_dir), PixelCache(test_files, shape, cache_dir)
    try:
        with running_model_code(code, params) as module:
            if module is None:
                model = build_model(len(index.class_names), params)
                augment = None
            else:
                assert code is not None  # a module is loaded only from model code
                model = _user_model(module, code, index.class_names, params)
                augment = _user_augment(module, code, params)
            check_output(model, load_arrays(files[:8], params), index.class_names, code)
            model = compile_if_needed(model, params)
            train_ds = make_dataset(files, labels, params, shuffle=True, cache=train_cache)
            if augment is not None:
                train_ds = train_ds.map(
                    lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
                )
            try:
                fit = model.fit(
                    train_ds,
                    validation_data=make_dataset(test_files, test_labels, params, shuffle=False, cache=test_cache)
                    if test_files
                    else None,
                    epochs=params["train"]["epochs"],
                    verbose=0,
                    callbacks=[_LogEpoch()],
                )
            except ModelCodeTimeout:
                raise
            except Exception as exc:  # with model code, a failing fit is the code's
                if code is None:
                    raise
                raise model_code.describe(exc, code, "training (model.fit)") from None
    finally:
        train_cache.close()
        test_cache.close()
    history = {k: [float(v) for v in values] for k, values in fit.history.items()}
    return model, history, parts


class _LogEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        log.info("epoch %d: %s", epoch + 1, shown)


def compile_predictor(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """A traced ``tf.function`` over the model: ~0.5 ms per call instead of ~30 ms for ``model.predict``."""
    shape = model.input_shape

    @tf.function(input_signature=[tf.TensorSpec((None, *shape[1:]), tf.float32)], reduce_retracing=True)
    def _call(batch):
        return model(batch, training=False)

    def predict(batch: np.ndarray) -> np.ndarray:
        return _call(tf.convert_to_tensor(batch, tf.float32)).numpy()

    predict(np.zeros((1, *shape[1:]), np.float32))  # trace and warm up once
    return predict


def export_serving(model: keras.Model, path: str | os.PathLike, sample: np.ndarray) -> None:
    """Write the code-free serving artifact: a TF SavedModel whose ``serve`` signature maps a float32
    batch ``(None, h, w, c)`` to the probabilities (Keras ``model.export``).

    Custom layers and models defined in the commit's code are traced into the graph, so the
    model server and the evaluation load it with ``load_serving`` and never import repository
    code.  The artifact is checked against the Keras model on ``sample`` before it is kept.
    """
    h, w, c = model.input_shape[1:] if getattr(model, "inputs", None) else sample.shape[1:]
    model.export(
        str(path),
        format="tf_saved_model",
        verbose=False,
        input_signature=[tf.TensorSpec((None, h, w, c), tf.float32, name="image")],
    )
    expected = np.asarray(model(tf.convert_to_tensor(sample, tf.float32), training=False))
    got = load_serving(path)(sample)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4):
        raise ModelCodeError(
            f"the exported serving model disagrees with the trained Keras model on {len(sample)} "
            f"images (max difference {np.max(np.abs(got - expected)):.3g}): the model's call must "
            "be deterministic at inference (training=False)"
        )


def load_serving(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The traced ``serve`` function of an exported artifact (``export_serving``): no Python model code."""
    loaded = tf.saved_model.load(str(path))
    spec = loaded.serve.concrete_functions[0].structured_input_signature[0][0]
    # One concrete function over the restored ``serve``: no signature dispatch per call (~20% less overhead).
    serve = tf.function(
        lambda batch: loaded.serve(batch),  # noqa: PLW0108 - a Python function for tf.function to trace
        input_signature=[tf.TensorSpec((None, *spec.shape[1:]), tf.float32)],
    ).get_concrete_function()

    def predict(batch: np.ndarray) -> np.ndarray:
        out = serve(tf.convert_to_tensor(batch, tf.float32))
        if isinstance(out, dict):
            (out,) = out.values()
        return out.numpy()

    predict.artifact = loaded  # type: ignore[attr-defined]  # keep the restored object (and its variables) alive with the function
    predict(np.zeros((1, *spec.shape[1:]), np.float32))  # warm up once
    return predict


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray | Iterable[np.ndarray],
    y: np.ndarray | list[int],
    class_names: list[str],
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall and the confusion matrix (rows: true, columns: predicted).

    ``x`` is one array or an iterable of batches in the order of ``y`` (``image_batches``); only
    the predicted classes are kept, so memory does not grow with the number of images.
    """
    n = len(class_names)
    batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size)) if isinstance(x, np.ndarray) else x
    predicted = np.concatenate([np.zeros(0, np.int64)] + [predict(batch).argmax(axis=1) for batch in batches])
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y, dtype=np.int64), predicted), 1)
    true_pos = np.diag(confusion).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(confusion.sum(axis=0) > 0, true_pos / confusion.sum(axis=0), 0.0)
        recall = np.where(confusion.sum(axis=1) > 0, true_pos / confusion.sum(axis=1), 0.0)
    return {
        "accuracy": float(true_pos.sum() / max(1, len(y))),
        "n_test": len(y),
        "precision": {c: float(p) for c, p in zip(class_names, precision, strict=True)},
        "recall": {c: float(r) for c, r in zip(class_names, recall, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "predictions": predicted.tolist(),
    }


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def confusion_matrices_png(panels: list[tuple[str, list[list[int]]]], class_names: list[str]) -> bytes:
    """Confusion matrices side by side (e.g. challenger | champion), counts written in each cell."""
    plt = _pyplot()
    side = 1.0 + 0.45 * len(class_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels), side), squeeze=False)
    for ax, (title, confusion) in zip(axes[0], panels, strict=True):
        matrix = np.asarray(confusion)
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(class_names)), class_names, rotation=90)
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > matrix.max() / 2 else "black"
            )
    return _png(fig)


def learning_curves_png(panels: list[tuple[str, dict[str, list[float]]]]) -> bytes:
    """Loss and accuracy per epoch; one line per model and split (e.g. challenger and champion)."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (title, history), style in zip(panels, ("-", "--", ":"), strict=False):
        for key, values in history.items():
            ax = acc_ax if "acc" in key else loss_ax
            ax.plot(range(1, len(values) + 1), values, style, label=f"{title} {key}")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    return _png(fig)


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
