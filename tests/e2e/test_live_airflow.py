"""The whole path on a live Airflow (``airflow standalone``: scheduler, dag-processor, triggerer,
API server, LocalExecutor on SQLite), started by the test like ``make demo`` does."""

import time
from collections import Counter

import httpx
import pytest

from gitops_ml import demo, logs, registry, stack
from gitops_ml.airflow.client import AirflowClient
from tests.helpers import commit_file, github_push_headers, push_body, task_log


def total_runs(client) -> int:
    return client._check(client._http.get("/api/v2/dags/gitops_ml_pipeline/dagRuns"), "list runs")["total_entries"]


pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch):
    """The push webhook's secret, exported before the stack starts (autouse fixtures are set up first)."""
    monkeypatch.setenv("GITOPS_ML_WEBHOOK_SECRET", "live-hook-secret")


def test_push_starts_a_run_named_by_sha_and_serves_it(settings, demo_repo, live_stack, es):
    client = AirflowClient(live_stack["airflow"])
    client.wait_for_dag()
    commit_sha = demo_repo["commit_sha"]
    # Nobody triggers anything: the watcher (deferrable sensor in the triggerer) finds the head.
    finished = client.wait_for_run(f"commit__{commit_sha}", timeout=600)
    run = finished
    states = {ti["task_id"]: ti["state"] for ti in client.task_instances(run["dag_run_id"])}
    assert finished["state"] == "success", states
    assert finished["conf"]["commit_sha"] == commit_sha and commit_sha in finished["note"]
    # The scheduler's listener ended the note with the outcome.
    assert finished["note"].endswith("PROMOTED: version 1 is the first model served"), finished["note"]
    assert finished["conf"]["trigger"] == "push"

    served = httpx.get(live_stack["serving"] + "/version").json()
    assert served["commit_sha"] == commit_sha and served["airflow_run_id"] == f"commit__{commit_sha}"
    tags = registry.version_tags(registry.find_version(settings, commit_sha))
    assert tags["airflow_run_id"] == f"commit__{commit_sha}"

    # Triggering the same commit again returns the existing run instead of starting a second one.
    assert client.trigger_commit(commit_sha)["dag_run_id"] == run["dag_run_id"]
    assert total_runs(client) == 1
    assert httpx.get(live_stack["mlflow"] + "/health").status_code == 200

    # The UI plugin: listed by the API, and its DAG-run link lands on this commit's MLflow run.
    plugins = client._check(client._http.get("/api/v2/plugins"), "list plugins")["plugins"]
    assert any(p["name"] == "gitops_ml" for p in plugins)
    link = client._http.get(f"/gitops-ml/runs/gitops_ml_pipeline/commit__{commit_sha}/mlflow")
    mlflow_run = registry.find_training_run(settings, f"commit__{commit_sha}")
    assert link.status_code == 307 and link.headers["location"].startswith(live_stack["mlflow"])
    assert link.headers["location"].endswith(f"/runs/{mlflow_run.run_id}")

    # The UI's task log view: read back from Elasticsearch by the provider (local copies removed first).
    airflow_logs = settings.home / "airflow" / "logs"
    removed = [p for p in airflow_logs.rglob("*.log") if f"commit__{commit_sha}" in str(p)]
    assert removed, "Airflow wrote no local task log files"
    for path in removed:
        path.unlink()
    content = task_log(client, "gitops_ml_pipeline", f"commit__{commit_sha}", "train")
    events = [line.get("event", "") for line in content if isinstance(line, dict)]
    assert any(
        "Elasticsearch" in " ".join(line.get("sources", [])) for line in content if isinstance(line, dict)
    ) or any("gitops-ml-logs" in e for e in events), content[:3]
    shipped = logs.search(settings.home, commit_sha, task_id="train", client=es[0])
    messages = [d["message"] for d in shipped]
    # Every line of the task's log file was shipped (runner lines included) and the UI shows each of them;
    # the reader adds only its own "log message source details" group around them.
    assert not Counter(messages) - Counter(events), Counter(messages) - Counter(events)
    assert 0 <= len(events) - len(messages) <= 3, (len(events), len(messages))
    assert any(e.startswith("epoch 12:") for e in events)
    assert all(isinstance(e, str) and not e.startswith("{'dataset'") for e in events)

    # A burst of two commits pushed back to back (policy every): a run each, in whatever order the
    # scheduler starts them; once both settle, the branch head is what serves (convergence rule).
    older_sha = demo.bump_param(demo_repo["path"], "train.learning_rate", 0.004, "tune the learning rate")
    new_sha = demo.bump_param(demo_repo["path"], "train.seed", 7, "another seed")
    older = client.wait_for_run(f"commit__{older_sha}", timeout=600)
    second = client.wait_for_run(f"commit__{new_sha}", timeout=600)
    assert older["state"] == "success" and second["state"] == "success"
    assert second["conf"]["trigger"] == "push"
    assert httpx.get(live_stack["serving"] + "/version").json()["commit_sha"] == new_sha
    assert registry.serving_commit(settings) == new_sha
    if older["end_date"] > second["end_date"]:  # the older one ran last: it must not have deployed
        assert "NOT DEPLOYED" in older["note"] and new_sha in older["note"], older["note"]

    # Restart the scheduler, triggerer and the rest: no second run for a SHA already handled.
    stack.down(settings)
    restarted = stack.up(live_stack["settings"], **live_stack["ports"])
    client = AirflowClient(restarted["airflow"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the watcher waits again: its sensor deferred to the new triggerer
        latest = client._check(
            client._http.get(
                "/api/v2/dags/gitops_ml_watch__default/dagRuns", params={"order_by": "-run_after", "limit": 1}
            ),
            "runs",
        )["dag_runs"]
        if latest and latest[0]["state"] == "running":
            states = {
                ti["task_id"]: ti["state"]
                for ti in client.task_instances(latest[0]["dag_run_id"], "gitops_ml_watch__default")
            }
            if states.get("wait_for_commit") == "deferred":
                break
        time.sleep(1)
    else:
        pytest.fail("the watcher did not wait again after the restart")
    time.sleep(5)
    assert total_runs(client) == 3

    # The push webhook, served by the live API server (plugin app): a bad signature starts nothing,
    # a good one creates the run at once (a docs-only commit: recorded as "no retrain needed").
    docs_sha = commit_file(demo_repo["path"], "README.md", "how to use the model\n", "docs")
    body = push_body(new_sha, docs_sha)
    url = restarted["airflow"] + "/gitops-ml/webhooks/default"
    bad = httpx.post(url, content=body, headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert (
        bad.status_code == 401 and "X-Hub-Signature-256" in bad.json()["error"]
    )  # (no run: tests/e2e/test_watch_dags)
    good = httpx.post(url, content=body, headers=github_push_headers(body, "live-hook-secret"))
    assert good.status_code == 202, good.text
    created = good.json()["created"] + good.json()["existing"]  # the 1 s poller may have been first
    assert created == [f"commit__{docs_sha}"]
    docs_run = client.wait_for_run(f"commit__{docs_sha}", timeout=300)
    assert docs_run["state"] == "success" and docs_run["note"].startswith("NO RETRAIN NEEDED")
    assert httpx.get(live_stack["serving"] + "/version").json()["commit_sha"] == new_sha  # untouched
    assert total_runs(client) == 4
