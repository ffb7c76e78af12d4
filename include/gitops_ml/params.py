"""``params.yaml`` of a model repository: parsed, type-checked, defaults filled in.

The file is the single place a user tunes a run.  Its schema is :class:`Params` (pydantic): one
field per key, declaring its type, its default (absent: required) and, as ``description``, what a
valid value is.  Every error names the file, the dotted key and what was expected, e.g.
``params.yaml: train.epochs must be an integer >= 1, got 'ten' (str)``.

The rest of the code reads the validated params as a plain nested dict (``params["train"]["epochs"]``),
which is also what goes to XCom as JSON: :func:`validate` and :func:`load` return ``model_dump()``.
A section is a model (closed: unknown keys are refused) or, for free-form content handed as is to
user code, a ``dict[str, Any]`` field (``Field(default_factory=dict, description="a mapping")``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from gitops_ml.errors import ParamsError

PARAMS_FILE = "params.yaml"
MAX_BYTES = 64 * 1024

# Strict: a string is no number, and a bool (an int in Python) is always a mistake in params.
# An int stays an int (the params are hashed and logged as written).
Number = StrictInt | StrictFloat


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(_Section):
    path: StrictStr = Field("data/images", description="a relative path inside the repository")

    @field_validator("path")
    @classmethod
    def _inside_the_repository(cls, value: str) -> str:
        if not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError("not a relative path inside the repository")
        return value


class ImageParams(_Section):
    height: StrictInt = Field(ge=4, le=1024, description="an integer from 4 to 1024")
    width: StrictInt = Field(ge=4, le=1024, description="an integer from 4 to 1024")
    channels: StrictInt = Field(1, description="1 (grey) or 3 (RGB)")

    @field_validator("channels")
    @classmethod
    def _grey_or_rgb(cls, value: int) -> int:
        if value not in (1, 3):
            raise ValueError("neither 1 nor 3")
        return value


class TrainParams(_Section):
    epochs: StrictInt = Field(ge=1, le=10_000, description="an integer >= 1")
    batch_size: StrictInt = Field(ge=1, le=65_536, description="an integer >= 1")
    learning_rate: Number = Field(gt=0, lt=10, description="a number > 0")
    seed: StrictInt = Field(ge=0, description="an integer >= 0")
    test_fraction: Number = Field(0.2, gt=0, lt=1, description="a number between 0 and 1")
    timeout_minutes: Number = Field(
        360,
        gt=0,
        le=10_080,
        description="a number of minutes from 0 to 10080 (training, with the model code, stops after it)",
    )


class GateParams(_Section):
    min_accuracy: Number = Field(0.0, ge=0, le=1, description="a number from 0 to 1")
    max_accuracy_drop: Number = Field(1.0, ge=0, le=1, description="a number from 0 to 1")
    min_class_recall: Number | None = Field(None, ge=0, le=1, description="a number from 0 to 1, or null")


class DeployParams(_Section):
    watch_seconds: Number = Field(0, ge=0, le=86_400, description="a number of seconds from 0 to 86400")
    min_requests: StrictInt = Field(20, ge=1, description="an integer >= 1")
    min_clients: StrictInt = Field(3, ge=1, description="an integer >= 1 (distinct clients the watch window needs)")
    max_error_rate: Number = Field(0.05, ge=0, le=1, description="a number from 0 to 1")
    max_latency_ratio: Number = Field(3.0, ge=1, description="a number >= 1")
    max_low_confidence_increase: Number = Field(0.2, ge=0, le=1, description="a number from 0 to 1")


class Params(BaseModel):
    """The whole file: one field per section.  A section left out (or written empty) gets its defaults."""

    model_config = ConfigDict(extra="forbid")

    data: DataParams
    image: ImageParams
    train: TrainParams
    gate: GateParams
    deploy: DeployParams
    # Free-form, handed as is to the model code's build_model(input_shape, class_names, params); two keys
    # are ours too: ``module`` (the dotted module of the model code) and ``weights`` (a DVC-tracked folder).
    model: dict[str, Any] = Field(default_factory=dict, description="a mapping")


class _PlainLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: a few lines of ``*alias`` could expand to
    gigabytes once the params are hashed, logged to MLflow or copied (a "billion laughs")."""

    def compose_node(self, parent, index):  # see the class docstring
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ParamsError(
                f"{PARAMS_FILE}: YAML aliases (*{event.anchor}) are not allowed, line {event.start_mark.line + 1}"
            )
        return super().compose_node(parent, index)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field(loc: tuple) -> tuple[tuple, Any]:
    """The declared key an error at ``loc`` is about, and its field.

    ``loc`` goes on past a key's field for a union (``("train", "learning_rate", "int")``) or
    inside a free-form mapping: the key is where the declared schema ends.
    """
    model: Any = Params
    info = None
    for depth, part in enumerate(loc):
        if not _is_section(model) or part not in model.model_fields:
            return loc, None
        info = model.model_fields[part]
        if not _is_section(info.annotation):
            return loc[: depth + 1], info
        model = info.annotation
    return loc, info


def _message(errors: Sequence[Mapping[str, Any]], source: str) -> str:
    """One message for the first problem, in the order a reader fixes them: a value, then names."""
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    for error in errors:
        if error["type"] == "extra_forbidden":
            continue
        loc, info = _field(error["loc"])
        key = ".".join(map(str, loc))
        if len(error["loc"]) > len(loc) and len(loc) == 1:  # inside a free-form section
            inner = ".".join(str(part) for part in error["loc"] if part != "[key]")
            return f"{source}: {inner}: {error['msg']}, got {error['input']!r} ({_type_name(error['input'])})"
        if len(loc) == 1 and error["type"] != "missing":
            return f"{source}: {key} must be a mapping, got {_type_name(error['input'])}"
        expected = info.description if info is not None and info.description else error["msg"]
        if error["type"] == "missing":
            return f"{source}: missing required key {key} ({expected})"
        return f"{source}: {key} must be {expected}, got {error['input']!r} ({_type_name(error['input'])})"
    top = sorted(str(e["loc"][0]) for e in extra if len(e["loc"]) == 1)
    if top:
        return f"{source}: unknown section(s) {', '.join(top)}; known: {', '.join(sorted(Params.model_fields))}"
    section = extra[0]["loc"][:-1]
    names = sorted(".".join(map(str, e["loc"])) for e in extra if e["loc"][:-1] == section)
    known = _field(section)[1].annotation.model_fields
    dotted = ".".join(map(str, section))
    return f"{source}: unknown key(s) {', '.join(names)}; known in {dotted}: {', '.join(sorted(known))}"


def validate(raw: Any, source: str = PARAMS_FILE) -> dict:
    """Return a complete, validated params dict (nested, defaults filled in)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {_type_name(raw)}")
    # A section left out or written empty (``gate:``) gets its defaults, and a required key in it
    # is reported by its dotted name.
    sections: dict[str, dict[str, Any]] = {
        name: {} for name, info in Params.model_fields.items() if _is_section(info.annotation)
    }
    filled = {**sections, **{k: v for k, v in raw.items() if not (v is None and k in Params.model_fields)}}
    try:
        params = Params.model_validate(filled).model_dump()
    except ValidationError as exc:
        raise ParamsError(_message(exc.errors(include_url=False), source)) from None
    _check_model_keys(params["model"], source)
    return params


def _check_model_keys(model: dict[str, Any], source: str) -> None:
    """``model.module`` and ``model.weights``, the keys of the free-form ``model:`` section gitops-ml reads."""
    module = model.get("module")
    if module is not None and not (
        isinstance(module, str) and module and all(part.isidentifier() and part.isascii() for part in module.split("."))
    ):
        raise ParamsError(
            f"{source}: model.module must be a dotted Python module name relative to the repository "
            f"root (e.g. model.model), got {module!r} ({_type_name(module)})"
        )
    weights = model.get("weights")
    if weights is not None and not (
        isinstance(weights, str) and weights and not Path(weights).is_absolute() and ".." not in Path(weights).parts
    ):
        raise ParamsError(
            f"{source}: model.weights must be a relative path inside the repository (a folder "
            f"tracked with DVC), got {weights!r} ({_type_name(weights)})"
        )


def load(repo_root: Path) -> dict:
    """Read and validate ``params.yaml`` at the root of a checked-out commit."""
    path = Path(repo_root) / PARAMS_FILE
    if path.is_symlink():
        raise ParamsError(f"{PARAMS_FILE} is a symbolic link: commit the file itself")
    if not path.is_file():
        raise ParamsError(f"{PARAMS_FILE} not found at the root of the commit")
    if path.stat().st_size > MAX_BYTES:
        raise ParamsError(f"{PARAMS_FILE} is {path.stat().st_size} bytes, over the limit of {MAX_BYTES}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # safe, no aliases
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{PARAMS_FILE} is not valid YAML: {exc}") from None
    return validate(raw)


def flatten(params: dict) -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}`` (for MLflow params); nested mappings of a
    free-form section are flattened the same way."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[str(key)] = value
    return flat
