import re

import pytest
import yaml

from gitops_ml import params
from gitops_ml.demo import DEMO_PARAMS
from gitops_ml.errors import ParamsError


def test_demo_params_validate_and_fill_defaults():
    result = params.validate({k: dict(v) for k, v in DEMO_PARAMS.items() if k != "gate"})
    assert result["gate"] == {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "min_class_recall": None}
    assert result["train"]["epochs"] == DEMO_PARAMS["train"]["epochs"]
    assert params.flatten(result)["image.height"] == 8


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "epochs", "ten", "train.epochs must be an integer >= 1, got 'ten' (str)"),
        ("train", "epochs", True, "train.epochs must be an integer >= 1, got True (bool)"),
        ("train", "learning_rate", -1, "train.learning_rate must be a number > 0"),
        ("image", "channels", 2, "image.channels must be 1 (grey) or 3 (RGB)"),
        ("data", "path", "../outside", "data.path must be a relative path inside the repository"),
    ],
)
def test_wrong_type_or_value_names_the_key(section, key, value, expected):
    raw = {k: dict(v) for k, v in DEMO_PARAMS.items()}
    raw[section][key] = value
    with pytest.raises(ParamsError, match=re.escape("params.yaml: ")) as info:
        params.validate(raw)
    assert expected in str(info.value)


def test_missing_required_key_is_named():
    raw = {k: dict(v) for k, v in DEMO_PARAMS.items()}
    del raw["train"]["batch_size"]
    with pytest.raises(ParamsError, match=re.escape("missing required key train.batch_size")):
        params.validate(raw)


def test_unknown_section_and_non_mapping_are_refused(tmp_path):
    with pytest.raises(ParamsError, match="unknown section"):
        params.validate({**DEMO_PARAMS, "trian": {}})
    (tmp_path / "params.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        params.load(tmp_path)


def test_load_reports_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match=re.escape("params.yaml not found")):
        params.load(tmp_path)
    (tmp_path / "params.yaml").write_text("train: {epochs: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEMO_PARAMS))
    assert params.load(tmp_path)["image"]["width"] == 8


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """A "billion laughs" under any key: refused at the first alias, nothing expanded."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    text = yaml.safe_dump(DEMO_PARAMS) + "train_notes:\n" + "\n".join("  " + line for line in lines) + "\n"
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"YAML aliases \(\*a0\) are not allowed"):
        params.load(tmp_path)


def test_unknown_key_inside_a_section_is_named():
    raw = {k: dict(v) for k, v in DEMO_PARAMS.items()}
    raw["train"]["epochz"] = 3
    with pytest.raises(ParamsError, match=r"unknown key\(s\) train.epochz"):
        params.validate(raw)


def test_oversized_or_linked_params_file_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEMO_PARAMS) + "#" * params.MAX_BYTES)
    with pytest.raises(ParamsError, match="over the limit"):
        params.load(tmp_path)
    (tmp_path / "params.yaml").unlink()
    (tmp_path / "elsewhere.yaml").write_text(yaml.safe_dump(DEMO_PARAMS))
    (tmp_path / "params.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(ParamsError, match=re.escape("params.yaml is a symbolic link")):
        params.load(tmp_path)


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "learning_rate", "fast", "train.learning_rate must be a number > 0, got 'fast' (str)"),
        ("train", "test_fraction", False, "train.test_fraction must be a number between 0 and 1, got False (bool)"),
        (
            "gate",
            "min_class_recall",
            "all",
            "gate.min_class_recall must be a number from 0 to 1, or null, got 'all' (str)",
        ),
        ("image", "height", 4.5, "image.height must be an integer from 4 to 1024, got 4.5 (float)"),
    ],
)
def test_a_key_that_takes_an_int_or_a_float_names_the_key_not_the_type_tried(section, key, value, expected):
    raw = {k: dict(v) for k, v in DEMO_PARAMS.items()}
    raw[section][key] = value
    with pytest.raises(ParamsError) as info:
        params.validate(raw)
    assert str(info.value) == f"params.yaml: {expected}"


def test_numbers_stay_as_written_and_an_empty_section_gets_its_defaults():
    """The validated params are hashed (reuse) and logged: an int is not turned into a float."""
    raw = {k: dict(v) for k, v in DEMO_PARAMS.items()}
    raw["train"]["learning_rate"] = 1
    raw["gate"] = None
    result = params.validate(raw)
    assert result["train"]["learning_rate"] == 1 and type(result["train"]["learning_rate"]) is int
    assert result["gate"] == {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "min_class_recall": None}
    assert result["deploy"]["min_requests"] == params.DeployParams().min_requests == 20


def test_a_section_that_is_not_a_mapping_is_named():
    with pytest.raises(ParamsError, match=r"^params.yaml: train must be a mapping, got list$"):
        params.validate({**DEMO_PARAMS, "train": [1, 2]})
