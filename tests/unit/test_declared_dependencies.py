"""Every third-party package the code imports is declared in ``pyproject.toml``.

A package that arrives only as another one's dependency (NumPy through TensorFlow, FastAPI through
Airflow) can vanish or change major version when that one is upgraded; declaring what we import
keeps the environment honest.  The package, the plugin and the DAG files may import only the
runtime dependencies; tests and benchmarks may also import the ``dev`` group.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from tests.helpers import ROOT
from tests.unit.test_dependency_rule import imported_packages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Our own top-level modules: the package, the repository's test and benchmark packages, and the
# modules Airflow puts on the path from the DAG and plugin folders.
FIRST_PARTY = {
    "gitops_ml",
    "tests",
    "benchmarks",
    *(path.stem for folder in ("dags", "plugins") for path in (ROOT / folder).glob("*.py")),
}


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``GitPython`` == ``gitpython``, ``a_b`` == ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def declared(*requirements: str) -> set[str]:
    """The declared distributions, with the direct requirements of a declared distribution that ships
    no module of its own (``apache-airflow`` installs ``airflow`` through ``apache-airflow-core``)."""
    names = {requirement_name(requirement) for requirement in requirements}
    providing = {normalized(dist) for dists in importlib.metadata.packages_distributions().values() for dist in dists}
    for name in [n for n in names if n not in providing]:
        try:
            requirements_of_name = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # an optional extra not installed here (gpu)
            continue
        names |= {requirement_name(req) for req in requirements_of_name if "extra ==" not in req}
    return names


RUNTIME = declared(
    *PYPROJECT["project"]["dependencies"],
    *(req for reqs in PYPROJECT["project"].get("optional-dependencies", {}).values() for req in reqs),
)
DEVELOPMENT = RUNTIME | declared(*PYPROJECT["dependency-groups"]["dev"])


def undeclared(paths: list[Path], allowed: set[str]) -> list[str]:
    """``file:line imports module`` for each third-party import whose distribution is not in ``allowed``."""
    distributions = importlib.metadata.packages_distributions()
    wrong = []
    for path in paths:
        for module, line in sorted(imported_packages(path)):
            if module in sys.stdlib_module_names or module in FIRST_PARTY:
                continue
            providers = {normalized(dist) for dist in distributions.get(module, [])}
            if not providers & allowed:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found = ", ".join(sorted(providers)) or "no installed distribution"
                wrong.append(f"{where}:{line} imports {module} (from {found}), not declared in pyproject.toml")
    return wrong


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def test_the_package_plugin_and_dags_import_only_runtime_dependencies():
    assert undeclared(python_files("include", "plugins", "dags"), RUNTIME) == []


def test_tests_and_benchmarks_import_only_declared_dependencies():
    assert undeclared(python_files("tests", "benchmarks"), DEVELOPMENT) == []


def test_an_import_of_an_undeclared_package_is_reported(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\nimport yaml\n\n\ndef f():\n    from numpy import asarray\n    import gitops_ml\n")
    assert undeclared([source], declared("PyYAML>=6")) == [
        f"{source}:6 imports numpy (from numpy), not declared in pyproject.toml"
    ]
    assert undeclared([source], declared("PyYAML>=6", "numpy")) == []


def test_a_meta_distribution_declares_what_it_installs():
    assert {"apache-airflow-core", "apache-airflow-task-sdk"} <= declared("apache-airflow>=3.3.2,<3.4")
    assert "numpy" not in declared("tensorflow-cpu>=2.21")  # a real dependency of TensorFlow, still not ours
