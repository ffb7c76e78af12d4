"""One cluster for the whole ``tests/cluster`` session (see ``harness``), stopped also when a test fails."""

from __future__ import annotations

import pytest

from tests.cluster.harness import Cluster, missing_tools


@pytest.fixture(scope="session")
def cluster(request):
    missing = missing_tools()
    if missing:  # never skipped: the target installs these (.ci/run, make test-cluster)
        pytest.fail("the cluster test needs: " + "; ".join(missing))
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        kept = cluster.stop(keep_logs=request.session.testsfailed > 0)
        if kept:
            print(f"logs of the cluster's processes kept in {kept}")
