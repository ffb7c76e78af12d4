"""The model code of the model repository through Airflow (``dag.test()``), a real MLflow store, DVC
remote and ``gitops-ml serve`` process: the demo's own ``model/model.py``; a model change with a
custom layer serves a new version (also after the server restarts from nothing); a revert reuses;
every kind of bad model code fails the train task with nothing registered and nothing moved;
pretrained weights pinned by DVC; an unsigned commit's model code never runs under ``enforce``."""

import base64
import subprocess

import httpx
import numpy as np
import pytest
import yaml

from gitops_ml import demo, model_code, registry, source, trace
from tests.conftest import ServerProcess
from tests.e2e.test_dag import all_versions, load_dag, run_note, task_states
from tests.helpers import commit_file, git

pytestmark = pytest.mark.e2e

FAST = {"epochs": 2, "batch_size": 64}
OPEN_GATE = {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "min_class_recall": None}

CUSTOM = '''"""A model with a custom layer: the model server has no copy of this code."""
import keras

from model.layers import Brighten


def build_model(input_shape, class_names, params):
    inputs = keras.Input(input_shape, name="image")
    x = Brighten(params.get("gain", 1.5))(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(class_names), activation="softmax")(x)
    return keras.Model(inputs, outputs, name="custom_cnn")
'''

LAYERS = """import keras


class Brighten(keras.layers.Layer):
    def __init__(self, gain=1.5, **kwargs):
        super().__init__(**kwargs)
        self.gain = gain

    def call(self, x):
        return keras.ops.minimum(x * self.gain, 1.0)

    def get_config(self):
        return {**super().get_config(), "gain": self.gain}
"""


@pytest.fixture(autouse=True)
def patient_deploys(monkeypatch):
    """Deploys on a loaded 2-core machine: the server loads and warms up each version before the switch."""
    monkeypatch.setenv("GITOPS_ML_DEPLOY_TIMEOUT", "180")


def set_params(repo, message, **sections) -> str:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] = {**(params.get(section) or {}), **values} if values is not None else None
    return commit_file(repo, "params.yaml", yaml.safe_dump(params, sort_keys=False), message)


def digit_png(repo) -> bytes:
    first = sorted((repo / "data" / "images" / "3").iterdir())[0]
    return first.read_bytes()


def code_hash_at(repo) -> str:
    return model_code.locate(repo, {}).code_hash


def assert_nothing_moved(settings, server, count, champion, served):
    assert len(all_versions(settings)) == count
    assert str(registry.get_alias(settings).version) == champion
    assert server.version()["model_version"] == served["model_version"]
    assert server.version()["commit_sha"] == served["commit_sha"]


def test_model_code_change_serves_restarts_and_revert_reuses(airflow_db, settings, demo_repo, server, tmp_path):
    dag = load_dag()
    repo = demo_repo["path"]
    first = set_params(repo, "fast training, open gate", train=FAST, gate=OPEN_GATE)
    demo_hash = code_hash_at(repo)
    run = dag.test(run_conf={"commit_sha": first})
    assert run.state == "success", task_states(run)
    v1 = registry.find_version(settings, first)
    tags = registry.version_tags(v1)
    assert tags["model_code_hash"] == demo_hash and server.version()["model_code_hash"] == demo_hash
    artifacts = {a.path for a in registry.client(settings).list_artifacts(v1.run_id, "model_code/model")}
    assert artifacts == {"model_code/model/model.py"}
    assert any(a.path == registry.SERVING_ARTIFACT for a in registry.client(settings).list_artifacts(v1.run_id))

    (repo / "model" / "layers.py").write_text(LAYERS)
    (repo / "model" / "model.py").write_text(CUSTOM)
    git(repo, "add", "model")
    git(repo, "commit", "-qm", "custom layer model")
    custom_sha = git(repo, "rev-parse", "HEAD")
    custom_hash = code_hash_at(repo)
    assert custom_hash != demo_hash
    run = dag.test(run_conf={"commit_sha": custom_sha})
    assert run.state == "success", task_states(run)
    v2 = registry.find_version(settings, custom_sha)
    assert str(v2.version) == "2" and str(registry.get_alias(settings).version) == "2"
    served = server.version()
    assert (served["commit_sha"], served["model_version"], served["model_code_hash"]) == (custom_sha, "2", custom_hash)
    assert run_note(run).endswith("PROMOTED: version 2 replaced version 1")
    assert f"model_code_hash: {custom_hash}" in source.read_note(settings.repo_url, custom_sha, settings.git_cache_dir)
    chain = trace.trace(settings, custom_sha)
    assert chain["model_versions"][0]["model_code_hash"] == custom_hash
    assert f"model code {custom_hash}" in trace.render(chain)
    image = base64.b64encode(digit_png(repo)).decode()

    # The server restarted from nothing loads the code-free artifact of the custom-layer model.
    server.stop()
    restarted = ServerProcess(settings, tmp_path / "serve-restarted.log")
    try:
        assert restarted.version()["model_version"] == "2"
        answer = httpx.post(restarted.url + "/predict", json={"images": [image]}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "2" and answer.headers["X-Commit-Sha"] == custom_sha
        probabilities = answer.json()["predictions"][0]["probabilities"]
        assert abs(sum(probabilities.values()) - 1) < 1e-3 and len(probabilities) == 10

        # git revert of the model change: the inputs are those of version 1 again, nothing trains.
        git(repo, "revert", "--no-edit", custom_sha)
        revert_sha = git(repo, "rev-parse", "HEAD")
        assert code_hash_at(repo) == demo_hash
        count = len(all_versions(settings))
        run = dag.test(run_conf={"commit_sha": revert_sha})
        assert run.state == "success", task_states(run)
        states = task_states(run)
        assert states["train"] == "skipped" and states["deploy"] == "success"
        assert len(all_versions(settings)) == count
        served = restarted.version()
        assert (served["commit_sha"], served["model_version"], served["model_code_hash"]) == (
            revert_sha,
            "1",
            demo_hash,
        )
    finally:
        restarted.stop()


BAD = {
    "syntax error": (
        "def build_model(input_shape, class_names, params)\n    return None\n",
        "model/model.py, line 1: syntax error",
    ),
    "exception in build_model": (
        "def build_model(input_shape, class_names, params):\n    return 1 / 0\n",
        "model/model.py, line 2, in build_model: ZeroDivisionError",
    ),
    "no build_model": ("def make(input_shape):\n    pass\n", "model/model.py: defines no build_model"),
    "not a keras.Model": (
        "def build_model(input_shape, class_names, params):\n    return [1, 2]\n",
        "model/model.py: build_model returned builtins.list, not a keras.Model",
    ),
    "wrong output shape": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),"
        " keras.layers.Dense(3, activation='softmax')])\n",
        "model/model.py: the model's output has shape (batch, 3), expected (batch, 10)",
    ),
    "logits": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),"
        " keras.layers.Dense(10)])\n",
        "model/model.py: the model's output is not a probability distribution",
    ),
    "package not installed": (
        "import torchvision_not_installed\n",
        "model/model.py, line 1, in <module>: imports package 'torchvision_not_installed', which is not installed",
    ),
    "download at run time": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    path = keras.utils.get_file('w.h5', 'https://example.invalid/w.h5')\n",
        "model/model.py, line 4, in build_model: keras get_file(",
    ),
    "never finishes": (
        "def build_model(input_shape, class_names, params):\n    while True:\n        pass\n",
        "training with model/model.py did not finish within train.timeout_minutes = 0.05",
    ),
}


def test_bad_model_code_fails_the_train_task_and_moves_nothing(airflow_db, settings, demo_repo, server):
    dag = load_dag()
    repo = demo_repo["path"]
    good = set_params(repo, "fast training, open gate", train=FAST, gate=OPEN_GATE)
    run = dag.test(run_conf={"commit_sha": good})
    assert run.state == "success", task_states(run)
    served, count = server.version(), len(all_versions(settings))
    for case, (text, message) in BAD.items():
        if case == "never finishes":
            set_params(repo, "a short time limit", train={"timeout_minutes": 0.05})
        sha = commit_file(repo, "model/model.py", text, f"bad model code: {case}")
        run = dag.test(run_conf={"commit_sha": sha})
        states = task_states(run)
        assert run.state == "failed" and states["train"] == "failed", (case, states)
        assert states["register"] == states["deploy"] == "upstream_failed", (case, states)
        note = run_note(run)
        assert note.startswith(f"FAILED in step train: commit {sha}: ") and message in note, (case, note)
        assert_nothing_moved(settings, server, count, "1", served)
        assert registry.find_version(settings, sha) is None


BASE_MODEL = '''"""Fine-tuning: the convolution of a base model, its weights pinned by DVC (params.yaml model.weights)."""
import os

import keras


def base_model(input_shape):
    image = keras.Input(input_shape)
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="base_conv")(image)
    return keras.Model(image, features, name="base")


def build_model(input_shape, class_names, params):
    base = base_model(input_shape)
    base.load_weights(os.path.join(params["weights"], "base.weights.h5"))
    base.trainable = False
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Flatten()(base(inputs))
    outputs = keras.layers.Dense(len(class_names), activation="softmax")(x)
    return keras.Model(inputs, outputs, name="fine_tuned")
'''  # noqa: E501 - the model file's docstring


def test_pretrained_weights_pinned_by_dvc_are_fine_tuned(airflow_db, settings, demo_repo, server, tmp_path):
    """A base model trained on one dataset (digits 0-4, here, in this test), its weights tracked by
    DVC in the repository; the commit's model fine-tunes it on another (all ten digits)."""
    import keras

    from gitops_ml import data, training

    repo = demo_repo["path"]
    base_images = tmp_path / "base-data"
    demo.write_digits(base_images, limit_per_class=30)
    for digit in range(5, 10):
        subprocess.run(["rm", "-rf", str(base_images / str(digit))], check=True)
    base_index = data.scan_images(base_images, "base-data")
    base_params = {
        "image": {"height": 8, "width": 8, "channels": 1},
        "model": {},
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "learning_rate": 0.01,
            "seed": 1,
            "test_fraction": 0.2,
            "timeout_minutes": 10,
        },
    }
    keras.utils.set_random_seed(1)
    namespace: dict = {}
    exec(BASE_MODEL, namespace)  # the same base architecture as the model code's
    base = namespace["base_model"]((8, 8, 1))
    head = keras.Sequential(
        [keras.Input((8, 8, 1)), base, keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")]
    )
    training.compile_if_needed(head, base_params)
    x = training.load_arrays(base_index.files, base_params)
    head.fit(x, np.asarray(base_index.labels), epochs=2, verbose=0)
    (repo / "weights").mkdir()
    base.save_weights(repo / "weights" / "base.weights.h5")
    base_kernel = base.get_weights()[0]
    data.track_and_push(repo, "weights", "storage", str(demo_repo["remote"]))
    (repo / "model" / "model.py").write_text(BASE_MODEL)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "fine-tune a DVC-pinned base model")
    assert "weights/base.weights.h5" not in git(repo, "ls-files")  # in DVC, not in Git
    sha = set_params(repo, "name the weights", train=FAST, gate=OPEN_GATE, model={"weights": "weights"})
    subprocess.run(["rm", "-rf", str(repo / "weights")], check=True)  # only the remote has them now

    run = load_dag().test(run_conf={"commit_sha": sha})
    assert run.state == "success", task_states(run)
    version = registry.find_version(settings, sha)
    model, _ = registry.load_model(settings, version)
    assert np.array_equal(model.get_layer("base").get_layer("base_conv").get_weights()[0], base_kernel)
    assert server.version()["commit_sha"] == sha


MARKER_MODEL = """from pathlib import Path

Path({marker!r}).write_text("model code ran")


def build_model(input_shape, class_names, params):
    Path({marker!r}).write_text("model code ran")
"""


def test_unsigned_model_code_never_runs_under_enforce(airflow_db, settings, demo_repo, tmp_path, monkeypatch):
    repo = demo_repo["path"]
    key = tmp_path / "alice"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), "-C", "alice@example.com"], check=True
    )
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"alice@example.com {(tmp_path / 'alice.pub').read_text().strip()}\n")
    config = tmp_path / "watch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repositories": [
                    {
                        "name": "default",
                        "repo_url": str(repo),
                        "branch": "main",
                        "signatures": "enforce",
                        "allowed_signers": str(allowed),
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    marker = tmp_path / "marker"
    sha = commit_file(repo, "model/model.py", MARKER_MODEL.format(marker=str(marker)), "unsigned model code")

    dag = load_dag()
    for conf in (
        {"commit_sha": sha},
        {"commit_sha": sha, "watch": "default"},
        {
            "commit_sha": sha,
            "watch": "default",
            "decision": "rejected",
            "reason": f"signature policy enforce: commit {sha} is not signed",
        },
    ):
        run = dag.test(run_conf=conf)
        states = task_states(run)
        assert states["train"] in ("upstream_failed", "skipped"), (conf, states)
        assert run_note(run).startswith("REJECTED") or "REJECTED commit" in run_note(run), run_note(run)
        assert not marker.exists(), "the unsigned commit's model code ran"
    assert all_versions(settings) == []
