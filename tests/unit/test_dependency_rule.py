"""A module owns its dependency: only ``source`` imports GitPython, only ``data`` DVC, only ``registry``
MLflow, only ``training`` TensorFlow/Keras, only ``logs`` the Elasticsearch client.  Swapping a
backend touches one file; importing a light module never loads a heavy one."""

import ast
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

OWNERS = {
    "git": "source.py",
    "dvc": "data.py",
    "mlflow": "registry.py",
    "tensorflow": "training.py",
    "keras": "training.py",
    "elasticsearch": "logs.py",
}
PACKAGE = ROOT / "include" / "gitops_ml"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "plugins").glob("*.py"), *(ROOT / "dags").glob("*.py")])


def imported_packages(path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def test_each_backend_is_imported_by_its_owner_only():
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {package} (owner: gitops_ml/{OWNERS[package]})"
        for path in SOURCES
        for package, line in sorted(imported_packages(path))
        if package in OWNERS and not (path.parent == PACKAGE and path.name == OWNERS[package])
    ]
    assert wrong == []


@pytest.mark.parametrize(
    "module",
    [
        "gitops_ml.refs",
        "gitops_ml.records",
        "gitops_ml.logs",
        "gitops_ml.webhooks",
        "gitops_ml.signatures",
        "gitops_ml.params",
        "gitops_ml.config",
        "gitops_ml.watch",
        "gitops_ml.gate",
        "gitops_ml.images",
        "gitops_ml.runs",
        "gitops_ml.payloads",
        "gitops_ml.remote_head",
    ],
)
def test_light_modules_load_no_backend(module):
    code = f"import sys, json, {module}\nprint(json.dumps(sorted(m for m in {sorted(OWNERS)!r} if m in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    "module",
    ["gitops_ml.airflow.client", "gitops_ml.runs", "gitops_ml.payloads", "gitops_ml.remote_head", "gitops_ml.doctor"],
)
def test_library_modules_load_no_airflow(module):
    """The REST client, run naming, payload types, the remote head check and the doctor are library code:
    usable where Airflow is not installed."""
    code = (
        f"import sys, json, {module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def gitops_imports(path) -> set[tuple[str, int]]:
    """``gitops_ml.x.y`` modules imported by ``path`` (``from gitops_ml.x import y`` counts as ``gitops_ml.x.y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names if alias.name.startswith("gitops_ml")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gitops_ml"):
            found |= {(f"{node.module}.{alias.name}", node.lineno) for alias in node.names}
    return found


def test_library_never_climbs_into_the_airflow_adapters():
    """Rules, names and plans live in the library: no library module imports ``gitops_ml.airflow`` (the CLI's
    REST client aside), and the webhook endpoint reaches no task body (``steps``, ``watch_steps``)."""
    library = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "airflow") not in p.parents]
    climbs = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in library
        for name, line in sorted(gitops_imports(path))
        if name.startswith("gitops_ml.airflow") and not name.startswith("gitops_ml.airflow.client")
    ]
    task_bodies = [
        f"airflow/webhook.py:{line} imports {name}"
        for name, line in sorted(gitops_imports(PACKAGE / "airflow" / "webhook.py"))
        if name.split(".")[2:3] in (["steps"], ["watch_steps"])
    ]
    assert climbs == [] and task_bodies == []
