"""The convergence rule through Airflow: a burst seen by the watcher, its pipeline runs executed in the
worst order (newest first), a gate failure in the middle; the branch head ends up serving.

The watcher DAG runs through ``dag.test()`` and creates one queued pipeline run per commit in the real
Airflow DB; each run's conf is then executed with the pipeline DAG's ``dag.test()`` (no scheduler in
this process), newest commit first, as a queue that started the newer run first would.
"""

import pytest

from gitops_ml import demo, registry
from gitops_ml.airflow.steps import run_id_for
from tests.e2e.test_dag import load_dag, run_note, task_states
from tests.e2e.test_watch_dags import pipeline_runs, watch_config, watcher  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e


def test_burst_run_newest_first_with_a_gate_failure_converges_on_the_head(airflow_db, settings, demo_repo, server,
                                                                          watch_config):  # noqa: F811
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
