"""TensorFlow training and evaluation on a small mixed image folder (any classes, PNG+JPEG, grey+RGB)."""

import numpy as np
import pytest

from gitops_ml import data, params, training
from tests.integration.test_data import make_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "images"
    make_images(root, classes=("a", "b", "c"))
    return data.scan_images(root)


def small_params(channels=3):
    return params.validate(
        {
            "image": {"height": 12, "width": 12, "channels": channels},
            "train": {"epochs": 2, "batch_size": 4, "learning_rate": 0.01, "seed": 7, "test_fraction": 0.25},
        }
    )


def test_split_is_hash_based_stable_and_keeps_every_class(folder):
    one = training.split(folder, 0.25)
    assert one == training.split(folder, 0.25)
    assert sorted(one.train + one.test) == list(range(len(folder.files)))
    assert sorted({folder.labels[i] for i in one.test}) == [0, 1, 2]
    assert sorted({folder.labels[i] for i in one.train}) == [0, 1, 2]
    # Adding an image never moves another image across the split.
    extra = data.ImageIndex(
        folder.class_names, [*folder.files, folder.root + "/a/new.png"], [*folder.labels, 0], folder.root
    )
    two = training.split(extra, 0.25)
    assert set(one.test) <= set(two.test) | {i for i in one.test if folder.labels[i] == 0}


@pytest.mark.parametrize("channels", [1, 3])
def test_train_evaluate_predict_on_mixed_folder(folder, channels):
    p = small_params(channels)
    model, history, parts = training.train(folder, p)
    assert len(history["loss"]) == 2 and model.output_shape == (None, 3)
    predict = training.compile_predictor(model)
    x = training.load_arrays([folder.files[i] for i in parts.test], p)
    y = [folder.labels[i] for i in parts.test]
    assert x.shape == (len(parts.test), 12, 12, channels)
    assert np.allclose(predict(x), model(x, training=False).numpy(), atol=1e-5)
    result = training.evaluate(predict, x, y, folder.class_names)
    assert sum(map(sum, result["confusion_matrix"])) == len(y)
    assert 0.0 <= result["accuracy"] <= 1.0 and set(result["recall"]) == {"a", "b", "c"}
    png = training.confusion_matrices_png(
        [("a", result["confusion_matrix"]), ("b", result["confusion_matrix"])], folder.class_names
    )
    assert png.startswith(b"\x89PNG")


def test_same_seed_same_weights(folder):
    p = small_params(1)
    first, _, _ = training.train(folder, p)
    second, _, _ = training.train(folder, p)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        assert np.array_equal(a, b)
