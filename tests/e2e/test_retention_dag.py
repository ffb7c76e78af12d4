"""The failure callback of the pipeline DAG marks the run's work tree failed and keeps it for the configured time."""

import json
import time

import pytest

from gitops_ml import retention
from tests.e2e.test_dag import load_dag, task_states
from tests.helpers import change_demo_images
from tests.integration.test_retention import git_worktrees, remove_from_remote, trees

pytestmark = pytest.mark.e2e


def test_failed_run_keeps_its_work_tree_for_the_configured_time(airflow_db, settings, demo_repo, monkeypatch):
    repo, remote = demo_repo["path"], demo_repo["remote"]
    broken = change_demo_images(repo, str(remote), 7, "an image whose object never reached the remote")
    remove_from_remote(remote, repo, "7/extra.png")
    monkeypatch.setenv("GITOPS_ML_KEEP_WORKTREES", "0")
    monkeypatch.setenv("GITOPS_ML_KEEP_FAILED_HOURS", "2")

    run = load_dag().test(run_conf={"commit_sha": broken})

    assert run.state == "failed" and task_states(run)["pull_data"] == "failed"
    mark = json.loads((settings.work_dir / retention.STATE_DIR / f"{broken}.json").read_text())
    assert mark["outcome"] == "failed" and mark["run_id"] == run.run_id
    assert trees(settings) == git_worktrees(settings) == {broken}  # kept although GITOPS_ML_KEEP_WORKTREES=0
    report = retention.collect(
        settings.with_overrides(keep_worktrees=0, keep_failed_hours=2), now=time.time() + 2.1 * 3600
    )
    assert set(report.removed) == {broken} and trees(settings) == git_worktrees(settings) == set()
