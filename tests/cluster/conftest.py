"""One cluster for the whole ``tests/cluster`` session (see ``harness``), stopped also when a test fails."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

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
        cluster.start_redis()
        cluster.start_s3()
        with ThreadPoolExecutor(3) as pool:  # the slow starters side by side
            elasticsearch = pool.submit(cluster.start_elasticsearch)
            cluster.start_mlflow()
            cluster.start_git()
            # Two model repositories of different sizes (different data, so different SHAs and models).
            made = pool.map(cluster.create_model_repository, ("digits", "digits-b"), (20, 24))
            cluster.repos = {repo["name"]: repo for repo in made}
            elasticsearch.result()
        print(f"stores up in {time.monotonic() - started:.1f} s")
        servers = {"serve-1": "digits", "serve-2": "digits", "serve-b": "digits-b"}
        for name, model_name in servers.items():  # they start while Airflow does
            cluster.start_server(name, model_name, wait=False)
        cluster.watches = [
            {
                "name": "digits",
                "repo_url": cluster.git_url("digits"),
                "branch": "main",
                "poll_interval": 1,
                "retrain_schedule": None,
                "model_name": "digits",
                "serving_url": f"{cluster.url('serve-1')},{cluster.url('serve-2')}",
            },
            {
                "name": "digits-b",
                "repo_url": cluster.git_url("digits-b"),
                "branch": "main",
                "poll_interval": 1,
                "retrain_schedule": None,
                "model_name": "digits-b",
                "serving_url": cluster.url("serve-b"),
            },
        ]
        cluster.start_airflow(cluster.watches)
        for name in servers:
            cluster.wait_server(name)
        print(f"cluster up in {time.monotonic() - started:.1f} s: {cluster.describe()}")
        yield cluster
    finally:
        kept = cluster.stop(keep_logs=request.session.testsfailed > 0)
        if kept:
            print(f"logs of the cluster's processes kept in {kept}")
