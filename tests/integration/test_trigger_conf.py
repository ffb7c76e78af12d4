"""``gitops-ml trigger`` against a real Airflow API server (``airflow api-server`` on a migrated
SQLite DB with the DAGs serialized; no scheduler, so the runs it creates stay queued).

It finds the repository without anything exported (the demo repository under
``$GITOPS_ML_HOME/demo-repo``), puts it in the run conf (``repo_url`` + ``branch``, or only the
watch name), refuses a URL with credentials before anything reaches Airflow, and never lets a
credential into the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gitops_ml import stack
from gitops_ml.airflow.client import AirflowClient
from gitops_ml.config import Settings
from tests.git_http import GitHttpServer
from tests.helpers import commit_file, free_port, git, readme_block, run_bash

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SECRET = "tr1gger-s3cret"
WEBHOOK_SECRET = "hook-s3cret-for-the-readme"


def _base_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("GITOPS_ML_", "AIRFLOW_API_", "AIRFLOW__")) or k == "MLFLOW_TRACKING_URI")
    }
    return {**env, "GITOPS_ML_HOME": str(home), "GIT_TERMINAL_PROMPT": "0", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """A real Airflow 3.3 API server with the pipeline DAG in its DB."""
    base = tmp_path_factory.mktemp("trigger")
    home = base / "home"
    hooked = base / "hooked-repo"  # the `default` watch of this API server, for the webhook example
    hooked.mkdir()
    git(hooked, "init", "-q", "-b", "main")
    commit_file(hooked, "params.yaml", "train: {epochs: 1}\n", "first")
    commit_file(hooked, "params.yaml", "train: {epochs: 2}\n", "second")
    port = free_port()
    env = {
        **_base_env(home),
        **stack.airflow_env(Settings(home=home, repo_url=str(hooked)), port),
        "GITOPS_ML_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    for argv in (["airflow", "db", "migrate"], ["airflow", "dags", "reserialize"]):
        done = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr[-2000:]}"
    log = open(home / "api-server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(url + "/api/v2/monitor/health", 180, "Airflow API server", home / "api-server.log")
        client = AirflowClient(url)
        client.wait_for_dag()
        yield {"url": url, "home": home, "client": client, "hooked": hooked}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def home(api_server, tmp_path):
    """A fresh GITOPS_ML_HOME with a demo repository (plain git: the runs never execute here)."""
    home = tmp_path / "home"
    repo = home / stack.DEMO_REPO_DIR
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    return {"path": home, "repo": repo, "sha": commit_file(repo, "params.yaml", "train: {}\n", "params")}


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gitops-ml"), *args],
        env={**_base_env(home), **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def runs(api_server) -> list[dict]:
    client = api_server["client"]
    return client._check(client._request("GET", "/api/v2/dags/gitops_ml_pipeline/dagRuns"), "list runs")["dag_runs"]


def test_trigger_finds_the_demo_repository_and_puts_it_in_the_conf(api_server, home):
    result = cli(home["path"], "trigger", AIRFLOW_API_URL=api_server["url"])
    assert result.returncode == 0, result.stderr
    run = api_server["client"].get_run(f"commit__{home['sha']}")
    assert run is not None, f"no run commit__{home['sha']}: {result.stdout} {result.stderr}"
    assert run["conf"] == {
        "commit_sha": home["sha"],
        "repo_url": str(home["repo"]),
        "branch": "main",
        "trigger": "manual",
    }
    # Again: the same run, not a second one.
    again = cli(home["path"], "trigger", AIRFLOW_API_URL=api_server["url"])
    assert again.returncode == 0, again.stderr
    assert sum(r["dag_run_id"].startswith(f"commit__{home['sha']}") for r in runs(api_server)) == 1


def test_trigger_finds_airflow_through_the_stack_record(api_server, home):
    """Without AIRFLOW_API_URL the CLI asks the Airflow that `stack up` recorded for this home."""
    (home["path"] / "stack").mkdir()
    (home["path"] / "stack" / "stack.json").write_text(json.dumps({"urls": {"airflow": api_server["url"]}}))
    sha = commit_file(home["repo"], "README.md", "x\n", "readme")
    result = cli(home["path"], "trigger")
    assert result.returncode == 0, result.stderr
    assert api_server["client"].get_run(f"commit__{sha}") is not None


def test_nothing_configured_is_a_clear_error(api_server, tmp_path):
    result = cli(tmp_path / "empty-home", "trigger", AIRFLOW_API_URL=api_server["url"])
    assert result.returncode == 2
    assert "no repository to trigger" in result.stderr and "GITOPS_ML_REPO_URL" in result.stderr
    assert "init-demo" in result.stderr


def test_url_with_credentials_is_refused_before_airflow(api_server, home):
    before = len(runs(api_server))
    url = f"http://ci:{SECRET}@127.0.0.1:9/demo.git"
    result = cli(home["path"], "trigger", GITOPS_ML_REPO_URL=url, AIRFLOW_API_URL=api_server["url"])
    assert result.returncode == 2
    assert "carries credentials" in result.stderr and "--watch NAME" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert len(runs(api_server)) == before


def test_watched_repository_with_credentials_goes_by_its_name(api_server, home, tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(home["repo"]), str(root / "demo.git")], check=True)
    with GitHttpServer(root, username="ci", password=SECRET) as server:
        with_var = server.url("demo.git").replace(SECRET, "${GIT_TOKEN}")
        config = tmp_path / "watch.yaml"
        config.write_text(json.dumps({"repositories": [{"name": "private", "repo_url": with_var, "branch": "main"}]}))
        env = {"GITOPS_ML_WATCH_CONFIG": str(config), "GIT_TOKEN": SECRET, "AIRFLOW_API_URL": api_server["url"]}
        # Named explicitly ...
        result = cli(home["path"], "trigger", "--watch", "private", **env)
        assert result.returncode == 0, result.stderr
        run = api_server["client"].get_run(f"commit__{home['sha']}__private")
        assert run is not None and run["conf"] == {"commit_sha": home["sha"], "watch": "private", "trigger": "manual"}
        # ... or found from the configuration alone (the only watch): the same run, not a second one.
        result = cli(home["path"], "trigger", **env)
        assert result.returncode == 0, result.stderr
        assert f"commit__{home['sha']}__private" in result.stdout
        # ... or by its URL with the credentials: matched to the watch, the URL stays out of the conf.
        result = cli(home["path"], "trigger", GITOPS_ML_REPO_URL=server.url("demo.git"), **env)
        assert result.returncode == 0, result.stderr
        assert f"commit__{home['sha']}__private" in result.stdout
    everything = json.dumps(runs(api_server))
    assert SECRET not in everything and "${GIT_TOKEN}" not in everything
    assert SECRET not in result.stdout + result.stderr


def test_stack_settings_carry_the_repository_and_ports(tmp_path, monkeypatch):
    """What `stack up` exports to every process of the stack (pure: no process started)."""
    monkeypatch.delenv("GITOPS_ML_WATCH_CONFIG", raising=False)
    home = tmp_path / "home"
    settings = Settings(home=home)
    assert stack.stack_settings(settings).repo_url == ""  # no demo repository yet, nothing configured
    (home / stack.DEMO_REPO_DIR / ".git").mkdir(parents=True)
    monkeypatch.setenv("GITOPS_ML_HOME", str(home))
    exported = stack.stack_settings(settings, airflow_port=18080, mlflow_port=15000, serve_port=18765)
    env = stack.airflow_env(exported, 18080)
    assert env["GITOPS_ML_REPO_URL"] == str(home / stack.DEMO_REPO_DIR)
    assert env["GITOPS_ML_SERVING_URL"] == "http://127.0.0.1:18765"
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:18080"
    assert exported.mlflow_ui_url == "http://127.0.0.1:15000"
    configured = Settings(home=home, repo_url="/srv/models/vision", branch="team/vision")
    assert stack.stack_settings(configured).repo_url == "/srv/models/vision"


def test_readme_webhook_example_starts_the_run(api_server):
    """The README's example request, sent as written (curl, openssl) from the watched repository
    to this API server: the signature and headers it builds are accepted and the run is created."""
    script = readme_block("webhook-example")
    assert "http://127.0.0.1:8080/gitops-ml/webhooks/default" in script
    script = script.replace("http://127.0.0.1:8080", api_server["url"])
    hooked = api_server["hooked"]
    head = git(hooked, "rev-parse", "HEAD")
    env = {**_base_env(api_server["home"]), "GITOPS_ML_WEBHOOK_SECRET": WEBHOOK_SECRET}
    sent = run_bash(script, hooked, env, timeout=120)
    assert sent.returncode == 0, sent.stderr
    answer = json.loads(sent.stdout)
    assert answer.get("created") == [f"commit__{head}"], answer
    run = api_server["client"].get_run(f"commit__{head}")
    assert run is not None and run["conf"]["commit_sha"] == head and run["conf"]["trigger"] == "webhook"
    # The same script with another secret: refused, nothing more created.
    wrong = run_bash(script, hooked, {**env, "GITOPS_ML_WEBHOOK_SECRET": "not-the-secret"}, timeout=120)
    assert "X-Hub-Signature-256" in json.loads(wrong.stdout)["error"], wrong.stdout
