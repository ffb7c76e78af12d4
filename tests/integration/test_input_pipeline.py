"""The training input pipeline streams: decoded images alive are bounded, later epochs come from disk."""

import os
import time

import numpy as np
import pytest

from gitops_ml import data, demo, images, params, training

N_IMAGES = 400
BATCH = 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "images"
    demo.write_digits(root)
    return data.scan_images(root)


@pytest.fixture(scope="module")
def many(digits):
    """The first ``N_IMAGES`` digits (every class), as training would see them."""
    return [digits.files[i] for i in range(0, len(digits.files), 4)][:N_IMAGES]


def digit_params(**train):
    return params.validate({**demo.DEMO_PARAMS, "train": {**demo.DEMO_PARAMS["train"], "batch_size": BATCH, **train}})


@pytest.fixture
def decodes(monkeypatch):
    """Count every image the decoder turns into pixels (the real decoder runs)."""
    calls = []
    real = images.read_pixels

    def counting(path, *shape):
        calls.append(path)
        return real(path, *shape)

    # A spy, not a fake: every call still goes to the real decoder; it only counts the decodes.
    monkeypatch.setattr(images, "read_pixels", counting)
    return calls


def test_decoded_images_alive_are_bounded_not_the_dataset(many, decodes):
    """A slow consumer: the pipeline decodes only a few batches ahead, never the whole dataset
    (the previous `.map().cache().shuffle(len)` decoded all 400 before the first batch)."""
    p = digit_params()
    bound = training.max_decoded_ahead(BATCH)
    assert bound * 4 < N_IMAGES
    consumed, most_ahead = 0, 0
    for x, _labels in training.make_dataset(many, [0] * len(many), p, shuffle=True):
        consumed += len(x)
        if consumed in (BATCH, N_IMAGES // 2):
            # let every buffer fill up: first wait (bounded) for the prefetch to start on a loaded machine
            deadline = time.monotonic() + 15
            while len(decodes) == consumed and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        most_ahead = max(most_ahead, len(decodes) - consumed)
    assert consumed == N_IMAGES == len(decodes)
    assert 0 < most_ahead <= bound


def test_later_epochs_read_the_disk_cache_in_the_given_folder(many, decodes, tmp_path):
    p = digit_params()
    cache = training.PixelCache(many, training.input_shape(p), tmp_path)
    ds = training.make_dataset(many, list(range(len(many))), p, shuffle=False, cache=cache)
    first = np.concatenate([x.numpy() for x, _ in ds])
    assert len(decodes) == N_IMAGES
    assert cache.disk_bytes() == N_IMAGES * 8 * 8 * 1  # uint8 records, on disk
    second = np.concatenate([x.numpy() for x, _ in ds])
    assert len(decodes) == N_IMAGES, "the second epoch decoded again instead of reading the cache"
    assert np.array_equal(first, second)
    # The same decoder as serving: identical to images.decode of each file's bytes.
    served = np.stack([images.decode(open(f, "rb").read(), 8, 8, 1) for f in many])
    assert np.array_equal(first, served)
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing is left behind, whatever happens
    cache.close()
    with pytest.raises(OSError):
        cache.disk_bytes()


def test_shuffle_is_seeded_and_reshuffles_each_epoch(many):
    p = digit_params()
    labels = list(range(len(many)))

    def two_epochs():
        ds = training.make_dataset(many, labels, p, shuffle=True)
        return [np.concatenate([y.numpy() for _, y in ds]) for _ in range(2)]

    first, again = two_epochs(), two_epochs()
    assert sorted(first[0]) == labels and not np.array_equal(first[0], labels)
    assert not np.array_equal(first[0], first[1])
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_training_converges_on_digits_and_batched_evaluation_matches(digits, tmp_path):
    p = params.validate(demo.DEMO_PARAMS)
    model, history, parts = training.train(digits, p, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    test_files = [digits.files[i] for i in parts.test]
    y = [digits.labels[i] for i in parts.test]
    predict = training.compile_predictor(model)
    batched = training.evaluate(predict, training.image_batches(test_files, p, batch_size=64), y, digits.class_names)
    whole = training.evaluate(predict, training.load_arrays(test_files, p), y, digits.class_names)
    assert batched == whole
    assert batched["accuracy"] > 0.9 and batched["n_test"] == len(test_files) > 300
    assert history["val_accuracy"][-1] > 0.9


def test_evaluation_batches_need_only_the_image_shape(many):
    """Scoring a champion passes only its input shape: an unshuffled pass reads no train.* key."""
    shape_only = {"image": {"height": 8, "width": 8, "channels": 1}}
    batches = list(training.image_batches(many[:10], shape_only, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    expected = np.stack([images.decode(open(f, "rb").read(), 8, 8, 1) for f in many[:10]])
    assert np.array_equal(np.concatenate(batches), expected)
