"""The push webhook against a real Git repository and the real Airflow metadata DB: delivery
dedup (durable across processes: the API server restarting is a new process), and runs only
for a SHA that is the pushed branch's head or on that branch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from starlette.testclient import TestClient

from gitops_ml.runs import run_id_for
from tests.helpers import ROOT, commit_file, git, github_push_headers, push_body

pytestmark = pytest.mark.integration

SECRET = "hook-secret-delivery"


def _sync_dags_to_db():
    """Write the DAGs of ``dags/`` to the metadata DB, as the dag processor does (trigger_dag needs them)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        sync_bag_to_db(
            BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name),
            bundle.name,
            bundle.version,
        )


@pytest.fixture
def hook(airflow_db, settings, demo_repo, tmp_path, monkeypatch):
    name = "h" + uuid.uuid4().hex[:10]
    config = tmp_path / "watch.yaml"
    config.write_text(
        json.dumps({"repositories": [{"name": name, "repo_url": str(demo_repo["path"]), "branch": "main"}]})
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    monkeypatch.setenv("GITOPS_ML_WEBHOOK_SECRET", SECRET)
    _sync_dags_to_db()
    from gitops_ml.airflow.links import create_app

    return {
        "name": name,
        "client": TestClient(create_app()),
        "repo": demo_repo["path"],
        "head": demo_repo["commit_sha"],
    }


def github(body: bytes, delivery: str | None = None) -> dict[str, str]:
    """The headers of a push delivery signed with this file's secret."""
    return github_push_headers(body, SECRET, delivery)


def pipeline_run_ids() -> set[str]:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return {r.run_id for r in DagRun.find(dag_id="gitops_ml_pipeline", session=session)}


def delivery_variables() -> dict[str, str]:
    from airflow.models import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from gitops_ml.airflow.webhook import DELIVERY_PREFIX

    with create_session() as session:
        return {v.key: v.val for v in session.scalars(select(Variable).where(Variable.key.startswith(DELIVERY_PREFIX)))}


def test_a_redelivery_is_answered_duplicate_even_by_another_process(hook):
    client = hook["client"]
    new_sha = commit_file(hook["repo"], "README.md", "docs\n", "docs")
    body = push_body(hook["head"], new_sha)
    delivery = str(uuid.uuid4())
    first = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, delivery))
    assert first.status_code == 202, first.text
    [run_id] = first.json()["created"]
    assert run_id == run_id_for(new_sha, watch=hook["name"]) and first.json()["delivery_id"] == delivery
    again = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, delivery))
    assert again.status_code == 200, again.text
    assert again.json()["ignored"] == "duplicate delivery" and again.json()["delivery_id"] == delivery
    assert again.json()["head_sha"] == new_sha and again.json()["first_received_at"]
    assert any(delivery in key for key in delivery_variables())  # kept in the Airflow DB

    # A restarted API server is a new process: it reads the same DB and still knows the delivery.
    code = (
        "import json, sys; from gitops_ml.airflow.webhook import handle_push; "
        "print(json.dumps(handle_push(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].encode())))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, hook["name"], json.dumps(github(body, delivery)), body.decode()],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == 200 and payload["ignored"] == "duplicate delivery"

    # Another delivery of the same push (new id) is handled, and idempotent: the run exists already.
    other = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, str(uuid.uuid4())))
    assert other.status_code == 202 and other.json()["existing"] == [run_id] and other.json()["created"] == []


def test_a_sha_of_another_branch_starts_nothing(hook):
    client = hook["client"]
    git(hook["repo"], "checkout", "-qb", "feature")
    feature_sha = commit_file(hook["repo"], "params.yaml", "train: {epochs: 9}\n", "feature work")
    git(hook["repo"], "checkout", "-q", "main")
    before = pipeline_run_ids()
    body = push_body(hook["head"], feature_sha)  # signed, says "main", names a commit of "feature"
    delivery = str(uuid.uuid4())
    answer = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, delivery))
    assert answer.status_code == 409, answer.text
    error = answer.json()
    assert feature_sha in error["error"] and "'main'" in error["error"] and "not on branch" in error["error"]
    assert error["commit_sha"] == feature_sha and error["branch"] == "main" and error["branch_head"] == hook["head"]
    assert pipeline_run_ids() == before
    assert not any(delivery in key for key in delivery_variables())  # not handled: its redelivery will be


def test_an_old_sha_removed_by_a_force_push_or_unknown_starts_nothing(hook):
    client = hook["client"]
    dropped = commit_file(hook["repo"], "params.yaml", "train: {epochs: 7}\n", "soon rewritten")
    git(hook["repo"], "reset", "-q", "--hard", hook["head"])
    rewritten = commit_file(hook["repo"], "README.md", "other\n", "rewritten history")
    git(hook["repo"], "reflog", "expire", "--expire=now", "--all")
    before = pipeline_run_ids()
    body = push_body(hook["head"], dropped)  # an old, genuinely signed delivery replayed
    answer = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, str(uuid.uuid4())))
    # The repository still holds the object (not garbage-collected), but it is not on main any more.
    assert answer.status_code in (409, 422), answer.text
    assert dropped in answer.json()["error"] and answer.json()["branch_head"] == rewritten
    unknown = "ab" * 20
    body = push_body(hook["head"], unknown)
    answer = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body, str(uuid.uuid4())))
    assert (
        answer.status_code == 422 and unknown in answer.json()["error"] and "does not exist" in answer.json()["error"]
    )
    assert pipeline_run_ids() == before
    # The head itself, and a commit on the branch below the head, are accepted.
    body = push_body(hook["head"], rewritten)
    assert client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body)).status_code == 202
    newer = commit_file(hook["repo"], "README.md", "newer\n", "newer")
    body = push_body(hook["head"], rewritten)  # delivered late: the branch has moved on to `newer`
    late = client.post(f"/webhooks/{hook['name']}", content=body, headers=github(body))
    assert late.status_code == 202, late.text
    assert newer not in json.dumps(late.json()["decisions"])
