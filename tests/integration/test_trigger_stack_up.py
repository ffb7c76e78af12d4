"""``gitops-ml stack up --airflow-port/--mlflow-port/--serve-port`` through the CLI, as a user runs it:
nothing exported but ``GITOPS_ML_HOME``, the demo repository under it. The real embedded stack
(``airflow standalone``, MLflow server, ``gitops-ml serve``) starts on the chosen ports, its
processes get the repository and those ports, and ``gitops-ml trigger`` finds both by itself.
The user's home (``HOME``, an empty folder here) is left untouched: everything is under ``GITOPS_ML_HOME``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import commit_file, free_port, git

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def user_home(home: Path) -> Path:
    """The ``HOME`` of the commands run on ``home``: an empty folder next to it."""
    path = home.parent / "user-home"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("GITOPS_ML_", "AIRFLOW_API_", "AIRFLOW__", "AIRFLOW_HOME")) or k == "MLFLOW_TRACKING_URI")
    }
    return subprocess.run(
        [str(BIN / "gitops-ml"), *args],
        env={**env, "GITOPS_ML_HOME": str(home), "HOME": str(user_home(home))},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_command_that_imports_airflow_leaves_the_users_home_alone(tmp_path):
    """``trigger`` imports Airflow, which reads and creates its home (``~/airflow`` by default)."""
    home = tmp_path / "home"
    result = cli(home, "trigger")
    assert result.returncode == 2 and "no repository to trigger" in result.stderr, result.stderr[-3000:]
    assert "airflow.cfg" not in result.stderr or str(home / "airflow" / "airflow.cfg") in result.stderr
    assert sorted(p.name for p in user_home(home).rglob("*")) == []


def process_env(pid_file: Path) -> dict[str, str]:
    raw = Path(f"/proc/{pid_file.read_text().strip()}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_stack_up_on_chosen_ports_finds_the_demo_repository(tmp_path):
    home = tmp_path / "home"
    repo = home / "demo-repo"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    sha = commit_file(repo, "README.md", "not a model yet\n", "first")
    ports = {"airflow": free_port(), "mlflow": free_port(), "serving": free_port()}
    try:
        up = cli(
            home,
            "stack",
            "up",
            "--airflow-port",
            str(ports["airflow"]),
            "--mlflow-port",
            str(ports["mlflow"]),
            "--serve-port",
            str(ports["serving"]),
        )
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr[-3000:]}"
        for name, port in ports.items():
            assert f"{name}: http://127.0.0.1:{port}" in up.stdout, up.stdout
        assert f"repository: {repo} [main] (the demo repository)" in up.stdout, up.stdout
        assert f"GITOPS_ML_SERVING_URL=http://127.0.0.1:{ports['serving']}" in up.stdout

        assert httpx.get(f"http://127.0.0.1:{ports['serving']}/health", timeout=60).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=60).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['airflow']}/api/v2/monitor/health", timeout=60).status_code == 200
        airflow = process_env(home / "stack" / "airflow.pid")
        assert airflow["GITOPS_ML_REPO_URL"] == str(repo)
        assert airflow["GITOPS_ML_SERVING_URL"] == f"http://127.0.0.1:{ports['serving']}"
        assert airflow["GITOPS_ML_MLFLOW_UI_URL"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert airflow["AIRFLOW__API__PORT"] == str(ports["airflow"])
        assert (
            json.loads((home / "stack" / "stack.json").read_text())["urls"]["airflow"]
            == f"http://127.0.0.1:{ports['airflow']}"
        )

        # trigger: no URL, no repository given; the watcher may have created the run already (same id).
        triggered = cli(home, "trigger")
        assert triggered.returncode == 0, triggered.stderr[-3000:]
        assert f"run commit__{sha} for commit {sha} of {repo}" in triggered.stdout, triggered.stdout

        # Other ports while it runs: refused, naming the running stack.
        other = cli(home, "stack", "up", "--airflow-port", str(free_port()))
        assert other.returncode == 2
        assert "already running" in other.stderr and f"127.0.0.1:{ports['airflow']}" in other.stderr
    finally:
        down = cli(home, "stack", "down")
    assert down.returncode == 0 and "airflow" in down.stdout, down.stdout + down.stderr
    assert not (home / "stack" / "stack.json").exists()
    assert sorted(str(p.relative_to(user_home(home))) for p in user_home(home).rglob("*")) == []
