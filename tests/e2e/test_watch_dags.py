"""The watcher and retraining DAGs through ``dag.test()`` against a real Git repository and the
Airflow metadata DB: one pipeline run per commit (named by its SHA), bursts, the same SHA seen
again, the path filter, the deferral path (the trigger runs inline), scheduled retraining and
the push webhook."""

import importlib.util
import json
import threading
import time
import uuid

import pytest

from gitops_ml import records
from gitops_ml.runs import run_id_for
from tests.helpers import ROOT, commit_file, git, github_push_headers, push_body

pytestmark = pytest.mark.e2e


@pytest.fixture
def watch_config(tmp_path, monkeypatch, demo_repo):
    """Write a watch configuration for the demo repository; return a function making a new watch."""
    path = tmp_path / "watch.yaml"
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(path))
    monkeypatch.setenv("GITOPS_ML_WEBHOOK_SECRET", "hook-secret-1")

    entries = []

    def make(**fields):
        name = "t" + uuid.uuid4().hex[:10]
        entries.append(
            {
                "name": name,
                "repo_url": str(demo_repo["path"]),
                "branch": "main",
                "poll_interval": 0.5,
                "sensor_timeout": 60,
                **fields,
            }
        )
        path.write_text(json.dumps({"repositories": entries}))  # JSON is YAML
        return name

    return make


def load_watch_dags():
    spec = importlib.util.spec_from_file_location("gitops_ml_watch_dags", ROOT / "dags" / "gitops_ml_watch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Run:
    def __init__(self, run):
        self.run_id, self.conf, self.note, self.state = run.run_id, dict(run.conf or {}), run.note or "", run.state


def pipeline_runs() -> dict[str, Run]:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return {r.run_id: Run(r) for r in DagRun.find(dag_id="gitops_ml_pipeline", session=session)}


def model_code_commit(repo, text, message):
    (repo / "src").mkdir(exist_ok=True)
    return commit_file(repo, "src/model_notes.py", text, message)


def watcher(name):
    return getattr(load_watch_dags(), f"watch__{name}")


def test_one_run_per_commit_bursts_and_the_same_sha_again(airflow_db, settings, demo_repo, watch_config):
    from airflow.models import Variable

    name = watch_config(policy="every")
    head = demo_repo["commit_sha"]
    run = watcher(name).test()
    assert run.state == "success"
    runs = pipeline_runs()
    assert run_id_for(head, watch=name) in runs
    first = runs[run_id_for(head, watch=name)]
    assert first.conf["commit_sha"] == head and first.conf["trigger"] == "push" and head[:12] in first.note
    assert Variable.get(f"gitops_ml_watch__{name}__last_sha") == head

    repo = demo_repo["path"]
    burst = [model_code_commit(repo, f"# change {i}\n", f"model code {i}") for i in range(4)]
    docs = commit_file(repo, "README.md", "docs\n", "docs only")
    assert watcher(name).test().state == "success"
    runs = pipeline_runs()
    for sha in burst:
        assert runs[run_id_for(sha, watch=name)].conf["decision"] == "train"
    assert runs[run_id_for(docs, watch=name)].conf["decision"] == "no_retrain"
    docs_run = runs[run_id_for(docs, watch=name)]
    assert docs_run.note.startswith("NO RETRAIN NEEDED") and "README.md" in docs_run.note
    count = len(runs)

    # The watcher sees the same SHAs again (e.g. its cursor was lost): no second run for any of them.
    Variable.set(f"gitops_ml_watch__{name}__last_sha", head)
    assert watcher(name).test().state == "success"
    assert len(pipeline_runs()) == count


def test_latest_policy_runs_only_the_newest_and_records_the_rest(airflow_db, settings, demo_repo, watch_config):
    from airflow.models import Variable

    name = watch_config(policy="latest")
    Variable.set(f"gitops_ml_watch__{name}__last_sha", demo_repo["commit_sha"])
    burst = [model_code_commit(demo_repo["path"], f"# v{i}\n", f"model code v{i}") for i in range(5)]
    assert watcher(name).test().state == "success"
    runs = pipeline_runs()
    assert run_id_for(burst[-1], watch=name) in runs and not any(
        run_id_for(sha, watch=name) in runs for sha in burst[:-1]
    )
    for sha in burst[:-1]:
        recorded = records.read(settings.records_dir / f"{sha}.jsonl")
        assert recorded and recorded[0]["event"]["outcome"] == "superseded"
        assert recorded[0]["superseded_by"] == burst[-1]


def test_waiting_sensor_defers_and_fires_on_push(airflow_db, settings, demo_repo, watch_config):
    """The cursor is at the head: the sensor defers; ``dag.test`` runs the trigger inline until a push."""
    from airflow.models import Variable

    name = watch_config()
    Variable.set(f"gitops_ml_watch__{name}__last_sha", demo_repo["commit_sha"])
    pushed = []

    def push_later():
        time.sleep(3)
        pushed.append(
            commit_file(
                demo_repo["path"], "params.yaml", (demo_repo["path"] / "params.yaml").read_text() + "# tuned\n", "tune"
            )
        )

    threading.Thread(target=push_later, daemon=True).start()
    started = time.monotonic()
    assert watcher(name).test().state == "success"
    assert time.monotonic() - started >= 3 and pushed
    assert run_id_for(pushed[0], watch=name) in pipeline_runs()


def test_scheduled_retraining_run_is_named_by_sha_and_time(airflow_db, settings, demo_repo, watch_config):
    name = watch_config(retrain_schedule="@weekly")
    run = getattr(load_watch_dags(), f"retrain__{name}").test()
    assert run.state == "success"
    retrains = [r for r in pipeline_runs().values() if r.run_id.startswith(f"retrain__{demo_repo['commit_sha']}__")]
    assert len(retrains) == 1
    assert retrains[0].conf["trigger"] == "schedule" and retrains[0].conf["commit_sha"] == demo_repo["commit_sha"]


def test_webhook_starts_the_run_at_once_and_the_poller_finds_it_done(airflow_db, settings, demo_repo, watch_config):
    from airflow.models import Variable
    from starlette.testclient import TestClient

    from gitops_ml.airflow.links import create_app

    name = watch_config()
    load_watch_dags()  # parse + serialize the DAGs like the dag processor would
    watcher(name).test()  # first observation: run for the current head
    before = demo_repo["commit_sha"]
    new_sha = model_code_commit(demo_repo["path"], "# webhook\n", "model code via webhook")
    body = push_body(before, new_sha, commits=[new_sha])
    client = TestClient(create_app())
    bad = client.post(f"/webhooks/{name}", content=body, headers=github_push_headers(body, "wrong-secret"))
    assert bad.status_code == 401 and run_id_for(new_sha, watch=name) not in pipeline_runs()
    assert "hook-secret-1" not in bad.text
    malformed = client.post(
        f"/webhooks/{name}", content=b"{not json", headers=github_push_headers(b"{not json", "hook-secret-1")
    )
    assert malformed.status_code == 400
    good = client.post(f"/webhooks/{name}", content=body, headers=github_push_headers(body, "hook-secret-1"))
    assert good.status_code == 202, good.text
    assert good.json()["created"] == [run_id_for(new_sha, watch=name)]
    assert pipeline_runs()[run_id_for(new_sha, watch=name)].conf["trigger"] == "webhook"
    assert client.post(f"/webhooks/{name}", content=body, headers=github_push_headers(body, "hook-secret-1")).json()[
        "existing"
    ] == [run_id_for(new_sha, watch=name)]
    count = len(pipeline_runs())
    assert Variable.get(f"gitops_ml_watch__{name}__last_sha") == before
    assert watcher(name).test().state == "success"  # the poller sees the pushed SHA: already done
    assert len(pipeline_runs()) == count
    assert git(demo_repo["path"], "rev-parse", "HEAD") == new_sha


@pytest.mark.parametrize("decision", ["no_retrain", "rejected"])
def test_pipeline_run_of_a_commit_not_to_train_records_why_and_runs_nothing(
    airflow_db, settings, demo_repo, server, decision
):
    from tests.e2e.test_dag import load_dag, task_states

    reason = "only README.md changed" if decision == "no_retrain" else f"commit {demo_repo['commit_sha']} is not signed"
    run = load_dag().test(run_conf={"commit_sha": demo_repo["commit_sha"], "decision": decision, "reason": reason})
    assert run.state == "success"
    states = task_states(run)
    assert states.pop("resolve_commit") == "skipped" and set(states.values()) == {"skipped"}, states
    recorded = records.read(settings.records_dir / f"{demo_repo['commit_sha']}.jsonl")
    assert [(r["event"]["action"], r["event"]["outcome"], r["reason"]) for r in recorded] == [
        ("watch", decision, reason)
    ]
    assert server.version() is None  # nothing was deployed: the server still has no model


def test_two_watched_branches_with_the_same_sha_each_get_their_run(airflow_db, settings, demo_repo, watch_config):
    """The same commit on two watched branches (e.g. main and production) is one run per watch."""
    first, second = watch_config(), watch_config(model_name="second-model")
    for name in (first, second):
        assert watcher(name).test().state == "success"
    runs = pipeline_runs()
    head = demo_repo["commit_sha"]
    assert runs[run_id_for(head, watch=first)].conf["watch"] == first
    assert runs[run_id_for(head, watch=second)].conf["watch"] == second
    assert run_id_for(head, watch="default") == f"commit__{head}"
