"""``params.yaml`` of a model repository: parsed, type-checked, defaults filled in.

The file is the single place a user tunes a run.  Every error names the file,
the dotted key and what was expected, e.g. ``params.yaml: train.epochs must be
an integer >= 1, got 'ten' (str)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from gitops_ml.errors import ParamsError

PARAMS_FILE = "params.yaml"

_REQUIRED = object()

# dotted key -> (type, default or _REQUIRED, check, description of a valid value)
_SCHEMA: dict[str, tuple[type | tuple[type, ...], Any, Any, str]] = {
    "data.path": (str, "data/images", lambda v: bool(v) and not Path(v).is_absolute() and ".." not in Path(v).parts,
                  "a relative path inside the repository"),
    "image.height": (int, _REQUIRED, lambda v: 4 <= v <= 1024, "an integer from 4 to 1024"),
    "image.width": (int, _REQUIRED, lambda v: 4 <= v <= 1024, "an integer from 4 to 1024"),
    "image.channels": (int, 1, lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    "train.epochs": (int, _REQUIRED, lambda v: 1 <= v <= 10_000, "an integer >= 1"),
    "train.batch_size": (int, _REQUIRED, lambda v: 1 <= v <= 65_536, "an integer >= 1"),
    "train.learning_rate": ((int, float), _REQUIRED, lambda v: 0 < v < 10, "a number > 0"),
    "train.seed": (int, _REQUIRED, lambda v: v >= 0, "an integer >= 0"),
    "train.test_fraction": ((int, float), 0.2, lambda v: 0 < v < 1, "a number between 0 and 1"),
    "gate.min_accuracy": ((int, float), 0.0, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "gate.max_accuracy_drop": ((int, float), 1.0, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "gate.min_class_recall": ((int, float, type(None)), None, lambda v: v is None or 0 <= v <= 1,
                              "a number from 0 to 1, or null"),
    "deploy.watch_seconds": ((int, float), 0, lambda v: 0 <= v <= 86_400, "a number of seconds from 0 to 86400"),
    "deploy.min_requests": (int, 20, lambda v: v >= 1, "an integer >= 1"),
    "deploy.min_clients": (int, 3, lambda v: v >= 1, "an integer >= 1 (distinct clients the watch window needs)"),
    "deploy.max_error_rate": ((int, float), 0.05, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "deploy.max_latency_ratio": ((int, float), 3.0, lambda v: v >= 1, "a number >= 1"),
    "deploy.max_low_confidence_increase": ((int, float), 0.2, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
}

_SECTIONS = {key.split(".")[0] for key in _SCHEMA}
_KEYS = {key.split(".")[0]: {k.split(".")[1] for k in _SCHEMA if k.startswith(key.split(".")[0] + ".")}
         for key in _SCHEMA}
MAX_BYTES = 64 * 1024


class _PlainLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: a few lines of ``*alias`` could expand to
    gigabytes once the params are hashed, logged to MLflow or copied (a "billion laughs")."""

    def compose_node(self, parent, index):  # noqa: D102 - see the class docstring
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ParamsError(f"{PARAMS_FILE}: YAML aliases (*{event.anchor}) are not allowed, "
                              f"line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)


def _type_name(value: Any) -> str:
    return type(value).__name__


def validate(raw: Any, source: str = PARAMS_FILE) -> dict:
    """Return a complete, validated params dict (nested, defaults filled in)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {_type_name(raw)}")
    params: dict[str, dict[str, Any]] = copy.deepcopy({k: v for k, v in raw.items()})
    for key, (expected, default, check, description) in _SCHEMA.items():
        section, name = key.split(".")
        block = params.setdefault(section, {})
        if block is None:
            block = params[section] = {}
        if not isinstance(block, dict):
            raise ParamsError(f"{source}: {section} must be a mapping, got {_type_name(block)}")
        if name not in block:
            if default is _REQUIRED:
                raise ParamsError(f"{source}: missing required key {key} ({description})")
            block[name] = default
            continue
        value = block[name]
        # bool is an int in Python; in params it is always a mistake.
        if isinstance(value, bool) or not isinstance(value, expected) or not check(value):
            raise ParamsError(f"{source}: {key} must be {description}, got {value!r} ({_type_name(value)})")
    unknown = sorted(set(params) - _SECTIONS, key=str)
    if unknown:
        raise ParamsError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(_SECTIONS))}")
    for section, known in _KEYS.items():
        extra = sorted(set(params[section]) - known, key=str)
        if extra:
            raise ParamsError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in extra)}; "
                              f"known in {section}: {', '.join(sorted(known))}")
    return params


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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506 - safe, no aliases
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{PARAMS_FILE} is not valid YAML: {exc}") from None
    return validate(raw)


def flatten(params: dict) -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}`` (for MLflow params)."""
    return {f"{s}.{k}": v for s, block in params.items() for k, v in block.items()}
