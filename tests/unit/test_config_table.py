"""The README's configuration table lists every environment variable the code reads, and nothing else.

gitops-ml's variables are the fields of the settings model (``gitops_ml.config.Settings``, read
through pydantic-settings); its defaults are the ones the table gives.  Any other read is found by
parsing the code (``ast``): a variable counts as read when it is the first argument of
``os.environ.get`` / ``environ.get`` / ``env.get`` / ``os.getenv`` / ``_env``, a ``os.environ[...]``
load, or an ``in os.environ`` test, and every string literal that is a whole gitops-ml,
Elasticsearch or Airflow-API variable name (``GITOPS_ML_*``, ``ES_*``, ``AIRFLOW_API_*``,
``MLFLOW_TRACKING_URI``) counts too.  A variable of the settings model read directly from the
environment anywhere else is a failure: the settings hold its one default.  Variables the code
only sets for its child processes (``os.environ.setdefault``, ``env[...] = ``) are not configuration.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gitops_ml.config import Settings, environment_variables

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("include", "plugins", "dags")
NAME = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")
PROJECT_NAME = re.compile(r"(GITOPS_ML_|ES_|AIRFLOW_API_)[A-Z0-9_]+|MLFLOW_TRACKING_URI")
READ_FUNCTIONS = {"getenv", "_env"}
ENV_RECEIVERS = {"os.environ", "environ", "env"}

# Read by the code but not a setting of gitops-ml: why each one is left out of the table.
NOT_SETTINGS = {
    "PATH": "the executable search path; `stack up` puts the venv's bin first",
    "GIT_CONFIG_COUNT": "git's own variable: the credential helper is appended to what the user set",
    "GITOPS_ML_GIT_USERNAME": "set by gitops-ml for its git child process only (credential helper)",
    "GITOPS_ML_GIT_PASSWORD": "set by gitops-ml for its git child process only (credential helper)",
}


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def variables_read(source: str, named: bool = True) -> set[str]:
    """The variables ``source`` reads; ``named``: also the strings that are a whole variable name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and _literal(node.args[0]):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and ast.unparse(func.value) in ENV_RECEIVERS:
                names.add(_literal(node.args[0]))
            elif isinstance(func, (ast.Name, ast.Attribute)) and ast.unparse(func).split(".")[-1] in READ_FUNCTIONS:
                names.add(_literal(node.args[0]))
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and ast.unparse(node.value) in ENV_RECEIVERS
            and _literal(node.slice)
        ):
            names.add(_literal(node.slice))
        elif (
            isinstance(node, ast.Compare)
            and _literal(node.left)
            and any(isinstance(op, ast.In) for op in node.ops)
            and any(ast.unparse(c) in ENV_RECEIVERS for c in node.comparators)
        ):
            names.add(_literal(node.left))
        elif named and _literal(node) and PROJECT_NAME.fullmatch(_literal(node)):
            names.add(_literal(node))
    return {n for n in names if NAME.fullmatch(n)}


def scanned_variables(named: bool = True) -> dict[str, list[str]]:
    """Variable -> the files whose code reads it (see :func:`variables_read`)."""
    found: dict[str, list[str]] = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in variables_read(path.read_text(), named):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def code_variables() -> dict[str, list[str]]:
    """Variable -> where it is read: the settings model's fields, and every other read in the code."""
    found = scanned_variables()
    for name in environment_variables().values():
        found.setdefault(name, []).insert(0, "gitops_ml.config.Settings")
    return found


def shown(default: object) -> str:
    """A default as the README's table writes it: ``120``, ``false``, ``main``."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def readme_table() -> dict[str, list[str]]:
    """Variable -> the cells of its row, from the table of the README's "## Configuration" section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Configuration' section"
    rows: dict[str, list[str]] = {}
    for line in section.group(1).splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            assert name not in rows, f"README configuration table lists {name} twice"
            rows[name] = cells
    assert rows, "README's Configuration section has no table of variables"
    return rows


def test_the_scanner_finds_reads_and_skips_writes():
    source = '''
import os
a = os.environ.get("A_READ")
b = os.environ["B_READ"]
os.environ["C_WRITTEN"] = "1"
os.environ.setdefault("D_DEFAULTED", "x")
e = _env("E_READ", "")
f = "F_READ" in os.environ
env = {"G_CHILD_ONLY": "1"}
h = env.get("H_READ")
i = name or "GITOPS_ML_I_NAMED"
j = os.getenv("J_READ")
"""docstring mentioning GITOPS_ML_NOT_A_READ"""
'''
    assert variables_read(source) == {"A_READ", "B_READ", "E_READ", "F_READ", "H_READ", "GITOPS_ML_I_NAMED", "J_READ"}


def test_every_variable_the_code_reads_is_in_the_readme_table():
    read = code_variables()
    table = readme_table()
    missing = {name: files for name, files in read.items() if name not in table and name not in NOT_SETTINGS}
    assert not missing, "variables read by the code but missing from README.md's configuration table: " + "; ".join(
        f"{n} (read in {', '.join(f)})" for n, f in sorted(missing.items())
    )


def test_every_table_entry_is_still_read_by_the_code():
    read = code_variables()
    stale = sorted(name for name in readme_table() if name not in read)
    assert not stale, f"README.md's configuration table lists variables no code reads any more: {', '.join(stale)}"
    unused_exceptions = sorted(name for name in NOT_SETTINGS if name not in read)
    assert not unused_exceptions, f"NOT_SETTINGS names variables no code reads: {unused_exceptions}"


def test_settings_variables_are_read_only_through_the_settings_model():
    direct = scanned_variables(named=False)
    settings_names = set(environment_variables().values())
    outside = {
        name: [f for f in files if f != "include/gitops_ml/config.py"]
        for name, files in direct.items()
        if name in settings_names
    }
    outside = {name: files for name, files in outside.items() if files}
    assert not outside, "read these from gitops_ml.config.Settings, which holds their one default: " + "; ".join(
        f"{n} (read in {', '.join(f)})" for n, f in sorted(outside.items())
    )


def test_the_table_gives_the_default_the_settings_model_declares():
    table = readme_table()
    for field, name in environment_variables().items():
        default = Settings.model_fields[field].default
        if default in ("", None) or Settings.model_fields[field].default_factory:
            continue  # "none", or a default derived from another setting: the table says it in words
        assert f"`{shown(default)}`" in table[name][1], (
            f"README configuration table: {name} defaults to `{shown(default)}` (gitops_ml.config.Settings."
            f"{field}), the table says {table[name][1]!r}"
        )


def test_every_table_row_gives_a_default_and_a_meaning():
    for name, cells in readme_table().items():
        assert len(cells) >= 3 and all(cells[:3]), (
            f"README configuration table row of {name} needs three filled cells (variable | default | meaning), "
            f"got {cells}"
        )
