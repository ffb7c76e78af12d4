"""The model code contract with real TensorFlow: a commit's ``model/model.py`` (or ``model.module``)
imported from its own work tree, trained, exported to a code-free artifact; every kind of bad model
code refused with the file and line (or the key)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gitops_ml import data, model_code, params, training
from gitops_ml.errors import InputError, ModelCodeError, ModelCodeTimeout
from tests.integration.test_data import make_images

pytestmark = pytest.mark.integration

CLASSES = ("a", "b", "c")

CUSTOM_LAYER = """
import keras
from model.blocks import Scale


def build_model(input_shape, class_names, params):
    inputs = keras.Input(input_shape, name="image")
    x = Scale(params.get("scale", 2.0))(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(params.get("units", 16), activation="relu")(x)
    outputs = keras.layers.Dense(len(class_names), activation="softmax")(x)
    return keras.Model(inputs, outputs, name=params.get("name", "custom"))


def augment(params):
    return [keras.layers.RandomFlip("horizontal", seed=1)]
"""

BLOCKS = '''
import keras


class Scale(keras.layers.Layer):
    """A custom layer: the server has no copy of this class."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor - 1.0

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
'''


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "images"
    make_images(root, classes=CLASSES)
    return data.scan_images(root)


def small_params(**model):
    return params.validate(
        {
            "image": {"height": 12, "width": 12, "channels": 1},
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "learning_rate": 0.01,
                "seed": 7,
                "test_fraction": 0.25,
                **model.pop("train", {}),
            },
            "model": model or None,
        }
    )


def work_tree(path, files: dict[str, str]):
    for relpath, text in files.items():
        (path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (path / relpath).write_text(textwrap.dedent(text))
    return path


def train_with(tmp_path, index, files, **model):
    p = small_params(**model)
    code = model_code.locate(work_tree(tmp_path / "tree", files), p["model"])
    return training.train(index, p, code), code, p


def test_custom_layer_model_trains_exports_and_serves_without_its_code(tmp_path, index):
    (model, history, parts), code, p = train_with(
        tmp_path,
        index,
        {"model/__init__.py": "", "model/model.py": CUSTOM_LAYER, "model/blocks.py": BLOCKS},
        units=8,
        name="from_params",
    )
    assert code.module == "model.model" and code.files == ("model/__init__.py", "model/blocks.py", "model/model.py")
    assert model.name == "from_params" and model.layers[-2].units == 8  # the model: section, as is
    assert model.compiled and len(history["loss"]) == 1  # compiled by us (uncompiled when returned)
    assert not [m for m in sys.modules if m == "model" or m.startswith("model.")]  # forgotten afterwards
    x = training.load_arrays([index.files[i] for i in parts.test], p)
    training.export_serving(model, tmp_path / "serving", x)
    # A fresh interpreter that has no copy of the model code serves the artifact.
    script = (
        "import sys, json, numpy as np\n"
        "from gitops_ml import training\n"
        f"predict = training.load_serving({str(tmp_path / 'serving')!r})\n"
        f"x = np.asarray(json.loads(sys.stdin.read()), np.float32)\n"
        "print(json.dumps(predict(x).tolist()))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'model' or m.startswith('model.'))))\n"
    )
    out = (
        subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(x.tolist()),
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        .stdout.strip()
        .splitlines()
    )
    assert json.loads(out[-1]) == []
    assert np.allclose(np.asarray(json.loads(out[-2])), model(x, training=False).numpy(), atol=1e-5)


def test_two_commits_in_one_process_each_get_their_own_code(tmp_path, index):
    built = []
    for name in ("first", "second"):
        tree = work_tree(
            tmp_path / name,
            {
                "model/model.py": CUSTOM_LAYER.replace('"custom"', repr(name)),
                "model/blocks.py": BLOCKS.replace("x * self.factor", f"x * {len(name)}"),
            },
        )
        p = small_params()
        model, _, _ = training.train(index, p, model_code.locate(tree, p["model"]))
        built.append(model)
    assert [m.name for m in built] == ["first", "second"]
    x = np.ones((1, 12, 12, 1), np.float32)
    assert (
        float(built[0].layers[1](x).numpy().max()) == 5 - 1.0 and float(built[1].layers[1](x).numpy().max()) == 6 - 1.0
    )


def test_model_module_names_another_module(tmp_path, index):
    (model, _, _), code, _ = train_with(
        tmp_path,
        index,
        {
            "nets/small.py": CUSTOM_LAYER.replace("from model.blocks import Scale", "from nets.blocks import Scale"),
            "nets/blocks.py": BLOCKS,
        },
        module="nets.small",
    )
    assert code.origin == "nets/small.py" and model.name == "custom"
    assert model_code.locate(tmp_path / "empty", {}) is None  # no model code: the built-in CNN
    with pytest.raises(
        ModelCodeError,
        match=r"params.yaml: model.module 'nets.big': neither nets/big.py nor "
        r"nets/big/__init__.py exists in the commit",
    ):
        model_code.locate(tmp_path / "tree", {"module": "nets.big"})


def test_code_hash_covers_every_file_of_the_package(tmp_path):
    tree = work_tree(tmp_path, {"model/model.py": CUSTOM_LAYER, "model/blocks.py": BLOCKS})
    before = model_code.locate(tree, {}).code_hash
    (tree / "model" / "blocks.py").write_text(BLOCKS + "\n# changed\n")
    assert model_code.locate(tree, {}).code_hash != before
    (tree / "model" / "blocks.py").write_text(BLOCKS)
    assert model_code.locate(tree, {}).code_hash == before


BAD = {
    "syntax": (
        "def build_model(input_shape, class_names, params)\n    return None\n",
        r"model/model.py, line 1: syntax error: expected ':'",
    ),
    "raises": (
        "def build_model(input_shape, class_names, params):\n    units = params['units']\n",
        r"model/model.py, line 2, in build_model: KeyError while calling build_model: 'units'",
    ),
    "missing": (
        "import keras\n\ndef make_model():\n    pass\n",
        r"model/model.py: defines no build_model\(input_shape, class_names, params\) function",
    ),
    "not_a_model": (
        "def build_model(input_shape, class_names, params):\n    return 'a model'\n",
        r"model/model.py: build_model returned builtins.str, not a keras.Model",
    ),
    "wrong_shape": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(5, activation='softmax')])\n",
        r"model/model.py: the model's output has shape \(batch, 5\), expected \(batch, 3\)",
    ),
    "logits": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),\n"
        "                             keras.layers.Dense(len(class_names))])\n",
        r"model/model.py: the model's output is not a probability distribution .*end the model with a softmax",
    ),
    "not_installed": (
        "import keras\nimport keras_hub_not_here.models\n",
        r"model/model.py, line 2, in <module>: imports package 'keras_hub_not_here', which is not "
        r"installed on the workers",
    ),
    "get_file": (
        "import keras\n\ndef build_model(input_shape, class_names, params):\n"
        "    keras.applications.MobileNetV2(weights='imagenet')\n",
        r"model/model.py, line 4, in build_model: keras get_file\(.*\) refused: downloads at training time "
        r"are not reproducible: track the file .* with DVC",
    ),
    "socket": (
        "import urllib.request\n\ndef build_model(input_shape, class_names, params):\n"
        "    urllib.request.urlopen('http://127.0.0.1:9/weights.h5')\n",
        r"model/model.py, line 4, in build_model: model code may not open network connections .*track the "
        r"file .* with DVC",
    ),
    "shadows": (None, r"model code package 'json' \(json/model.py\) has the name of an installed module"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_code_is_refused_naming_file_and_line(tmp_path, index, case):
    text, message = BAD[case]
    files = {"json/model.py": CUSTOM_LAYER} if text is None else {"model/model.py": text}
    with pytest.raises(ModelCodeError, match=message) as caught:
        train_with(tmp_path, index, files, **({"module": "json.model"} if text is None else {}))
    assert isinstance(caught.value, InputError)  # the Airflow task fails at once, no retries
    assert not [m for m in sys.modules if m == "model" or m.startswith("model.")]


def test_code_that_never_finishes_is_stopped_by_the_timeout(tmp_path, index):
    import signal

    outer, _ = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's alarm, when it uses one
    spin = "def build_model(input_shape, class_names, params):\n    while True:\n        pass\n"
    with pytest.raises(
        ModelCodeTimeout,
        match=r"training with model/model.py did not finish within "
        r"train.timeout_minutes = 0.02 \(params.yaml\)",
    ):
        train_with(tmp_path, index, {"model/model.py": spin}, train={"timeout_minutes": 0.02})
    # Our alarm is off again; an outer one (Airflow's execution_timeout, pytest-timeout) is re-armed.
    after, interval = signal.getitimer(signal.ITIMER_REAL)
    assert interval == 0.0 and (after == 0.0) == (outer == 0.0) and after <= outer


def test_model_params_are_validated():
    with pytest.raises(InputError, match=r"model.module must be a dotted Python module name .* got '../evil'"):
        small_params(module="../evil")
    with pytest.raises(InputError, match=r"model.weights must be a relative path inside the repository"):
        small_params(weights="/etc")
    with pytest.raises(InputError, match=r"train.timeout_minutes must be a number of minutes"):
        small_params(train={"timeout_minutes": -1})
    assert small_params(filters=8, nested={"a": [1, 2]})["model"] == {"filters": 8, "nested": {"a": [1, 2]}}
    assert small_params()["model"] == {} and small_params()["train"]["timeout_minutes"] == 360
