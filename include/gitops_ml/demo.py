"""``gitops-ml init-demo``: a model repository made from real data.

The 1,797 scanned handwritten digits that ship inside scikit-learn, written as
PNG files in ``data/images/<digit>/``, tracked with DVC, pushed to a DVC remote
and committed with a ``params.yaml``.  Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from gitops_ml import data, source

log = logging.getLogger(__name__)

DEMO_PARAMS = {
    "data": {"path": "data/images"},
    "image": {"height": 8, "width": 8, "channels": 1},
    "train": {"epochs": 12, "batch_size": 32, "learning_rate": 0.003, "seed": 42, "test_fraction": 0.2},
    "gate": {"min_accuracy": 0.8, "max_accuracy_drop": 0.02, "min_class_recall": None},
}

AUTHOR = ("gitops-ml demo", "demo@gitops-ml.invalid")

# The model code of the demo: gitops-ml's built-in CNN written as user code (the contract is in the README).
DEMO_MODEL = '''"""The Keras model of this repository: gitops-ml imports it in the training task of each commit.

build_model(input_shape, class_names, params) returns a keras.Model whose output is one
probability per class (end with a softmax); params is the `model:` section of params.yaml.
gitops-ml compiles it (Adam at train.learning_rate) when it is returned uncompiled.
"""

import keras


def build_model(input_shape, class_names, params):
    height, width, _ = input_shape
    filters = int(params.get("filters", 32))
    layers = [
        keras.Input(input_shape, name="image"),
        keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(2 * filters, 3, padding="same", activation="relu"),
    ]
    if min(height, width) >= 16:
        layers += [keras.layers.MaxPooling2D(),
                   keras.layers.Conv2D(2 * filters, 3, padding="same", activation="relu"),
                   keras.layers.GlobalAveragePooling2D()]
    else:
        layers += [keras.layers.Flatten()]
    layers += [keras.layers.Dense(128, activation="relu"),
               keras.layers.Dropout(float(params.get("dropout", 0.2))),
               keras.layers.Dense(len(class_names), activation="softmax", name="probabilities")]
    return keras.Sequential(layers, name="demo_cnn")
'''


def write_digits(images_dir: Path, limit_per_class: int | None = None) -> int:
    """Write the scikit-learn digits as 8x8 grey PNGs under ``images_dir/<digit>/``; return the count."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    written: dict[int, int] = {}
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(digit)
        if limit_per_class is not None and written.get(label, 0) >= limit_per_class:
            continue
        target = Path(images_dir) / str(label) / f"{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels * (255 / 16)).astype("uint8"), mode="L").save(target)
        written[label] = written.get(label, 0) + 1
    return sum(written.values())


def commit_all(repo, message: str) -> str:
    """Stage everything in the repository at ``repo`` (a path) and commit it with the demo identity
    unless the user configured one; return the new SHA."""
    return source.commit_all(Path(getattr(repo, "working_tree_dir", repo)), message, AUTHOR)


def init_demo(path: Path, remote_url: str, branch: str = "main", limit_per_class: int | None = None) -> dict:
    """Create the demo model repository at ``path`` (must not exist or be empty)."""
    path = Path(path).resolve()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new folder for the demo repository")
    path.mkdir(parents=True, exist_ok=True)
    source.init_repository(path, branch)
    (path / "params.yaml").write_text(yaml.safe_dump(DEMO_PARAMS, sort_keys=False))
    (path / "README.md").write_text(
        "# gitops-ml demo model repository\n\nHandwritten digits (scikit-learn) tracked with DVC in "
        "`data/images.dvc`, the Keras model in `model/model.py`. Edit `params.yaml` or the model and commit: "
        "gitops-ml retrains and deploys.\n"
    )
    (path / "model").mkdir()
    (path / "model" / "model.py").write_text(DEMO_MODEL)
    count = write_digits(path / "data" / "images", limit_per_class)
    data_hash = data.track_and_push(path, "data/images", "storage", remote_url)
    commit_sha = commit_all(path, f"Add {count} digit images tracked with DVC, params.yaml and model/model.py")
    log.info("demo repository %s: commit %s, %d images, data hash %s", path, commit_sha, count, data_hash)
    return {
        "path": str(path),
        "commit_sha": commit_sha,
        "images": count,
        "data_hash": data_hash,
        "dvc_remote": remote_url,
        "branch": branch,
    }


def bump_param(path: Path, key: str, value, message: str | None = None) -> str:
    """Change one ``section.name`` in ``params.yaml`` and commit it; return the new SHA."""
    path = Path(path)
    params = yaml.safe_load((path / "params.yaml").read_text())
    section, name = key.split(".")
    params.setdefault(section, {})[name] = value
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return commit_all(path, message or f"Set {key} = {value}")
