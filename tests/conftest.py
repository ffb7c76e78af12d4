"""Shared fixtures: real Git repositories, a real DVC remote, a real MLflow store, a real server.

Airflow reads its configuration once, at import: the environment for the
in-process ``dag.test()`` runs is therefore set here, before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT, free_port, git

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="gitops-ml-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "GIT_PYTHON_REFRESH": "quiet",
        "NO_PROXY": "127.0.0.1,localhost",
    }
)
for _key in [k for k in os.environ if k.startswith("GITOPS_ML_") or k == "MLFLOW_TRACKING_URI"]:
    del os.environ[_key]


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory) -> dict:
    """One demo repository (real digits, real DVC remote) built once; tests copy it."""
    from gitops_ml import demo

    base = tmp_path_factory.mktemp("template")
    info = demo.init_demo(base / "repo", str(base / "dvc-remote"))
    return {**info, "base": base}


@pytest.fixture
def demo_repo(demo_template, tmp_path) -> dict:
    """A private copy of the demo repository and its DVC remote (the remote path is rewritten)."""
    base = demo_template["base"]
    repo = tmp_path / "repo"
    remote = tmp_path / "dvc-remote"
    shutil.copytree(base / "repo", repo, symlinks=True)
    shutil.copytree(base / "dvc-remote", remote)
    config = repo / ".dvc" / "config"
    config.write_text(config.read_text().replace(str(base / "dvc-remote"), str(remote)))
    git(repo, "commit", "-qam", "Point the DVC remote at this test's copy")
    return {
        "path": repo,
        "remote": remote,
        "commit_sha": git(repo, "rev-parse", "HEAD"),
        "data_hash": demo_template["data_hash"],
    }


@pytest.fixture
def settings(tmp_path, demo_repo, monkeypatch):
    """Settings with all state under this test's folder, exported for in-process Airflow tasks."""
    from gitops_ml.config import Settings

    home = tmp_path / "home"
    env = {
        "GITOPS_ML_HOME": str(home),
        "GITOPS_ML_REPO_URL": str(demo_repo["path"]),
        "GITOPS_ML_BRANCH": "main",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "GITOPS_ML_ARTIFACT_ROOT": str(home / "mlflow" / "artifacts"),
        "GITOPS_ML_SERVING_URL": f"http://127.0.0.1:{free_port()}",
        "GITOPS_ML_DEPLOY_TIMEOUT": "60",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    from gitops_ml import registry

    registry.experiment_id(settings)  # create the store before a server process reads it
    return settings


class ServerProcess:
    def __init__(self, settings, log_path: Path):
        self.settings = settings
        self.url = settings.serving_url
        port = self.url.rsplit(":", 1)[1]
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [str(BIN / "gitops-ml"), "serve", "--host", "127.0.0.1", "--port", port],
            env={**os.environ},
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        import httpx

        deadline = time.monotonic() + 240  # TensorFlow's import alone takes a minute on a loaded 2-core machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()  # not left running behind the failed test
        raise RuntimeError(f"server not ready: {log_path.read_text()[-2000:]}")

    def version(self) -> dict | None:
        import httpx

        response = httpx.get(self.url + "/version", timeout=10)
        return None if response.status_code == 503 else response.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def server(settings, tmp_path):
    """A real ``gitops-ml serve`` process on a free loopback port."""
    proc = ServerProcess(settings, tmp_path / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the session's Airflow metadata DB (SQLite) once."""
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True, env=os.environ)
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def elasticsearch_url():
    """A real Elasticsearch: ``ES_URL`` when given, else a node from Maven Central started here.

    Skipped only on an explicit opt-out (``GITOPS_ML_SKIP_ES=1``); a node that cannot start fails.
    """
    if os.environ.get("GITOPS_ML_SKIP_ES") == "1":
        pytest.skip("Elasticsearch tests disabled explicitly with GITOPS_ML_SKIP_ES=1")
    if os.environ.get("ES_URL"):
        yield os.environ["ES_URL"], None
        return
    from tests.es_node import ElasticsearchNode

    node = ElasticsearchNode().start()
    yield node.url, node
    node.remove()


@pytest.fixture
def es(elasticsearch_url, monkeypatch):
    """An Elasticsearch client with the gitops-ml indices emptied; ``ES_URL`` exported for the code under test."""
    from gitops_ml import logs

    url, node = elasticsearch_url
    monkeypatch.setenv("ES_URL", url)
    client = logs.es_client(url)
    client.options(ignore_status=404).indices.delete(index=f"{logs.LOGS_INDEX}*", expand_wildcards="all")
    yield client, node
    client.close()
