"""One cluster for the whole ``tests/cluster`` session (see ``harness``), stopped also when a test fails."""

from __future__ import annotations

import time

import pytest

from tests.cluster.harness import Cluster, missing_tools


@pytest.fixture(scope="session")
def cluster(request):
    missing = missing_tools()
    if missing:  # never skipped: the target installs these (.ci/run, make test-cluster)
        pytest.fail("the cluster test needs: " + "; ".join(missing))
    started = time.monotonic()
    cluster = Cluster()
    try:
        cluster.start_postgres()
        print(f"start_postgres: {time.monotonic() - started:.1f} s")
        cluster.start_redis()
        print(f"start_redis: {time.monotonic() - started:.1f} s")
        cluster.start_s3()
        print(f"start_s3: {time.monotonic() - started:.1f} s")
        cluster.start_mlflow()
        print(f"start_mlflow: {time.monotonic() - started:.1f} s")
        cluster.start_elasticsearch()
        print(f"start_elasticsearch: {time.monotonic() - started:.1f} s")
        cluster.start_git()
        print(f"start_git: {time.monotonic() - started:.1f} s")
        # Two model repositories of different sizes (different data, so different SHAs and models).
        cluster.repos = {"digits": cluster.create_model_repository("digits", 20),
                         "digits-b": cluster.create_model_repository("digits-b", 24)}
        cluster.start_server("serve-1", "digits")
        cluster.start_server("serve-2", "digits")
        cluster.start_server("serve-b", "digits-b")
        cluster.watches = [
            {"name": "digits", "repo_url": cluster.git_url("digits"), "branch": "main", "poll_interval": 1,
             "retrain_schedule": None, "model_name": "digits",
             "serving_url": f"{cluster.url('serve-1')},{cluster.url('serve-2')}"},
            {"name": "digits-b", "repo_url": cluster.git_url("digits-b"), "branch": "main", "poll_interval": 1,
             "retrain_schedule": None, "model_name": "digits-b", "serving_url": cluster.url("serve-b")},
        ]
        cluster.start_airflow(cluster.watches)
        print(f"start_airflow: {time.monotonic() - started:.1f} s")
        print(f"cluster up in {time.monotonic() - started:.1f} s: {cluster.describe()}")
        yield cluster
    finally:
        kept = cluster.stop(keep_logs=request.session.testsfailed > 0)
        if kept:
            print(f"logs of the cluster's processes kept in {kept}")
