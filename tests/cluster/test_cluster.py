"""Scenarios on the cluster of ``tests/cluster/harness.py`` (CeleryExecutor, two workers that share no
disk, PostgreSQL, Redis, S3, an MLflow server, Elasticsearch, two replicas of the model server).

The tests run in file order on one cluster; each starts from what the previous one left (the
commits of a repository only move forward)."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime

import pytest

from gitops_ml.airflow.client import AirflowClient
from gitops_ml.airflow.steps import run_id_for
from tests.cluster.harness import BIN
from tests.helpers import free_port, git

pytestmark = pytest.mark.cluster


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture(scope="session")
def airflow(cluster):
    client = AirflowClient(cluster.url("api"), retry_seconds=120)
    client.wait_for_dag(timeout=180)
    return client


def finished_run(airflow, watch: str, commit_sha: str, timeout: float = 900) -> dict:
    run_id = run_id_for(commit_sha, watch=watch)
    deadline = time.monotonic() + timeout
    while airflow.get_run(run_id) is None:  # the watcher starts it
        assert time.monotonic() < deadline, f"no run {run_id} after {timeout:.0f} s"
        time.sleep(1)
    run = airflow.wait_for_run(run_id, timeout=max(1.0, deadline - time.monotonic()))
    states = {ti["task_id"]: (ti["state"], ti.get("hostname")) for ti in airflow.task_instances(run_id)}
    assert run["state"] == "success", f"{run_id}: {states}"
    return run


def test_a_two_repositories_pushed_at_once_run_concurrently_on_both_workers(cluster, airflow):
    """Both repositories were pushed before the watchers' first poll: both pipelines run at the same
    time, their task instances land on both workers, and each model is served by its servers."""
    runs = {name: finished_run(airflow, name, repo["commit_sha"]) for name, repo in cluster.repos.items()}
    tis = {name: airflow.task_instances(run["dag_run_id"]) for name, run in runs.items()}
    spans = {name: (when(run["start_date"]), when(run["end_date"])) for name, run in runs.items()}
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, f"the two runs did not overlap: {spans}"
    hosts = {name: {ti["hostname"] for ti in items if ti["state"] == "success"} for name, items in tis.items()}
    assert set().union(*hosts.values()) == {"worker-a", "worker-b"}, hosts
    # At least one moment where one run's task ran on one worker while the other run's ran on the other.
    overlapping = [(x["task_id"], x["hostname"], y["task_id"], y["hostname"])
                   for x in tis["digits"] for y in tis["digits-b"]
                   if x["state"] == y["state"] == "success" and x["hostname"] != y["hostname"]
                   and when(x["start_date"]) < when(y["end_date"]) and when(y["start_date"]) < when(x["end_date"])]
    assert overlapping, {name: [(t["task_id"], t["hostname"], t["start_date"], t["end_date"]) for t in items]
                         for name, items in tis.items()}
    print(f"scenario a: runs {spans}; hosts {hosts}; concurrent pairs on different workers: {len(overlapping)}")
    for server in ("serve-1", "serve-2"):
        served = cluster.serving(server)
        assert served and served["commit_sha"] == cluster.repos["digits"]["commit_sha"], (server, served)
    served = cluster.serving("serve-b")
    assert served and served["commit_sha"] == cluster.repos["digits-b"]["commit_sha"], served
    # The model artifacts went through the MLflow server into S3, not onto a worker's disk.
    keys = [o["Key"] for o in cluster.s3_client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert keys, "no artifact in the MLflow bucket"


def doctor(cluster, **changes: str) -> tuple[int, dict[str, str], str]:
    """``gitops-ml doctor`` with the scheduler's configuration (plus ``changes``): status, line per check."""
    env = {**os.environ, **cluster.procs["scheduler"].env, **changes}
    done = subprocess.run([str(BIN / "gitops-ml"), "doctor"], env=env, capture_output=True, text=True, timeout=600)
    lines = {}
    for line in done.stdout.splitlines():  # library log lines may be interleaved: only the checks
        status, _, rest = line.partition(" ")
        if status not in ("OK", "FAIL", "SKIP"):
            continue
        name, _, detail = rest.strip().partition(": ")
        lines[name] = f"{status} {detail}"
    return done.returncode, lines, done.stdout


def test_doctor_passes_every_check_on_the_working_cluster(cluster, airflow):
    status, lines, output = doctor(cluster)
    print(output)
    expected = {"watch file", "airflow api", "metadata db", "broker", "mlflow", "artifact store", "elasticsearch",
                *(f"serving {cluster.url(s)}" for s in ("serve-1", "serve-2", "serve-b")),
                *(f"{kind} {name}" for kind in ("git", "dvc remote") for name in ("digits", "digits-b"))}
    assert set(lines) == expected, output
    assert status == 0 and all(v.startswith("OK ") for v in lines.values()), output
    for secret in cluster.secret.values():
        assert secret not in output


def test_doctor_names_what_to_fix_in_a_broken_configuration(cluster, airflow, tmp_path):
    """Wrong database password, unreachable broker host, a DVC remote whose bucket is missing, wrong Git token."""
    repo = cluster.create_model_repository("no-bucket", 2)
    dvc = [str(BIN / "dvc"), "remote", "modify", "s3r", "url", "s3://missing-bucket/no-bucket"]
    subprocess.run(dvc, cwd=repo["path"], check=True, capture_output=True)
    git(repo["path"], "commit", "-qam", "DVC remote in a bucket that does not exist")
    git(repo["path"], "push", "-q", "origin", "main")
    watches = [*cluster.watches, {"name": "no-bucket", "repo_url": cluster.git_url("no-bucket"),
                                  "retrain_schedule": None}]
    wrong_db = cluster.airflow_db_url.replace(cluster.secret["airflow"], "wrong-password")
    unreachable = cluster.broker_url.replace(str(cluster.ports["redis"]), str(free_port()))
    status, lines, output = doctor(cluster, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=wrong_db,
                                   AIRFLOW__CELERY__BROKER_URL=unreachable,
                                   GITOPS_ML_WATCH_CONFIG=str(cluster.write_watch_file(tmp_path, watches)))
    print(output)
    assert status == 1, output
    assert lines["metadata db"].startswith("FAIL") and "password authentication failed" in lines["metadata db"]
    assert "set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" in lines["metadata db"]
    assert lines["broker"].startswith("FAIL") and "set AIRFLOW__CELERY__BROKER_URL" in lines["broker"]
    assert lines["dvc remote no-bucket"].startswith("FAIL") and "missing-bucket" in lines["dvc remote no-bucket"]
    assert "no-bucket" in lines["dvc remote no-bucket"].split("fix:")[1]
    assert lines["dvc remote digits"].startswith("OK") and lines["mlflow"].startswith("OK")
    assert "wrong-password" not in output and cluster.secret["redis"] not in output

    status, lines, output = doctor(cluster, GIT_TOKEN="wrong-token")
    assert status == 1 and lines["git digits"].startswith("FAIL") and "watch 'digits'" in lines["git digits"], output
    assert "wrong-token" not in output

