"""The convergence rule through Airflow: a burst seen by the watcher, its pipeline runs executed in the
worst order (newest first), a gate failure in the middle; the branch head ends up serving.

The watcher DAG runs through ``dag.test()`` and creates one queued pipeline run per commit in the real
Airflow DB; each run's conf is then executed with the pipeline DAG's ``dag.test()`` (no scheduler in
this process), newest commit first, as a queue that started the newer run first would.
"""

import pytest

from gitops_ml import demo, registry
from gitops_ml.runs import run_id_for
from tests.e2e.test_dag import load_dag, run_note, task_states
from tests.e2e.test_watch_dags import pipeline_runs, watch_config, watcher  # noqa: F401 - fixture
from tests.helpers import github_push_headers, push_body

pytestmark = pytest.mark.e2e


def test_burst_run_newest_first_with_a_gate_failure_converges_on_the_head(
    airflow_db, settings, demo_repo, server, watch_config
):
    name = watch_config(policy="every")
    head = demo_repo["commit_sha"]
    assert watcher(name).test().state == "success"
    first = load_dag().test(run_conf=pipeline_runs()[run_id_for(head, watch=name)].conf)
    assert first.state == "success", task_states(first)

    repo = demo_repo["path"]
    b = demo.bump_param(repo, "gate.max_accuracy_drop", 1.0, "B: tolerate any drop")
    c = demo.bump_param(repo, "gate.min_accuracy", 0.9999, "C: an impossible gate")
    d = demo.bump_param(repo, "gate.min_accuracy", 0.8, "D: gate back to 0.8")
    assert watcher(name).test().state == "success"
    queued = pipeline_runs()
    confs = {sha: queued[run_id_for(sha, watch=name)].conf for sha in (b, c, d)}

    done = {}
    for sha in (d, c, b):  # newest first
        done[sha] = load_dag().test(run_conf=confs[sha])
        assert done[sha].state == "success", task_states(done[sha])

    assert run_note(done[d]).endswith("replaced version 1")
    assert "NOT PROMOTED" in run_note(done[c])
    assert f"is older than commit {d}" in run_note(done[b]) and task_states(done[b])["deploy"] == "success"
    served = server.version()
    assert served["commit_sha"] == d and served["model_version"] == str(registry.find_version(settings, d).version)
    assert registry.serving_commit(settings) == d


@pytest.mark.parametrize("policy", ["every", "latest"])
def test_five_commits_pushed_at_once_through_the_webhook_converge_on_the_head(
    airflow_db, settings, demo_repo, server, watch_config, policy
):
    """Five commits in one push, announced by a signed webhook (no poller): under ``every`` a run each, run
    newest first (the third fails its gate, the fourth reuses the second's model); under ``latest`` only the
    head's run. Either way the head serves once the runs settle."""
    import uuid

    from starlette.testclient import TestClient

    from gitops_ml.airflow.links import create_app
    from tests.integration.test_webhook_delivery import _sync_dags_to_db

    name = watch_config(policy=policy)
    base = demo_repo["commit_sha"]
    assert watcher(name).test().state == "success"  # the cursor starts at the base commit
    assert load_dag().test(run_conf=pipeline_runs()[run_id_for(base, watch=name)].conf).state == "success"

    repo = demo_repo["path"]
    shas = [
        demo.bump_param(repo, "gate.max_accuracy_drop", 1.0, "1: tolerate any drop"),
        demo.bump_param(repo, "train.seed", 7, "2: another seed"),
        demo.bump_param(repo, "gate.min_accuracy", 0.9999, "3: an impossible gate"),
        demo.bump_param(repo, "gate.min_accuracy", 0.8, "4: back to 2's params"),
        demo.bump_param(repo, "train.learning_rate", 0.004, "5: tune the learning rate"),
    ]
    head = shas[-1]
    _sync_dags_to_db()
    body = push_body(base, head)
    answer = TestClient(create_app()).post(
        f"/webhooks/{name}", content=body, headers=github_push_headers(body, "hook-secret-1", str(uuid.uuid4()))
    )
    assert answer.status_code == 202, answer.text
    expected = shas if policy == "every" else [head]
    assert sorted(answer.json()["created"]) == sorted(run_id_for(sha, watch=name) for sha in expected)

    queued = pipeline_runs()
    for sha in reversed(expected):  # newest first
        run = load_dag().test(run_conf=queued[run_id_for(sha, watch=name)].conf)
        assert run.state == "success", task_states(run)
        if sha != head and sha != shas[2]:
            assert f"is older than commit {head}" in run_note(run), run_note(run)
    served = server.version()
    assert served["commit_sha"] == head and registry.serving_commit(settings) == head
    assert served["model_version"] == str(registry.find_version(settings, head).version)
