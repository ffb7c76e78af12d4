"""Pipeline throughput with one Celery worker against two, in the same run (issue 14, item 5).

    python -m benchmarks.pipeline_throughput [--commits 4] [--phase-timeout 600]

Starts the cluster of ``make test-cluster`` (``Cluster.start`` in ``tests/cluster/harness.py``:
PostgreSQL, Redis, moto S3, the MLflow server, Elasticsearch, the Git server, the Airflow
api-server, scheduler, dag-processor and triggerer, two Celery workers of concurrency 1 in their
own mount namespaces, three model-server replicas) with two model repositories watched at a 1 s
poll interval and the harness's tiny training settings (8x8 images, 2 epochs).

1. warm-up: the watchers' first runs (each repository's initial head) finish, on both workers;
2. one worker: ``worker-b`` is stopped; ``--commits`` commits are pushed, alternating between the
   two repositories (so runs of different repositories can overlap), each with a ``train`` change
   of its own (a learning rate never used before: no run may reuse an earlier model);
3. two workers: ``worker-b`` is started again; ``--commits`` more commits, pushed the same way.

Per phase: the time from the first push until every run of the phase has finished (its last
run's end date in Airflow), runs per hour, and the ratio of the two.  Deploys are one at a time
by design (``max_active_tis_per_dag=1`` on ``deploy``), in both phases alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

from benchmarks._common import OUT_DIR, begin, log
from gitops_ml.airflow.client import AirflowClient
from tests.cluster.harness import MODEL_REPOSITORIES, Cluster, missing_tools, watched_run

REPOSITORIES = tuple(MODEL_REPOSITORIES)


def when(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def finish(airflow: AirflowClient, watch: str, commit_sha: str, deadline: float) -> dict:
    run = watched_run(airflow, watch, commit_sha, timeout=max(1.0, deadline - time.monotonic()))
    run_id = run["dag_run_id"]
    hosts = sorted({ti.get("hostname") or "-" for ti in airflow.task_instances(run_id) if ti["state"] == "success"})
    return {
        "run_id": run_id,
        "state": run["state"],
        "start": when(run["start_date"]),
        "end": when(run["end_date"]),
        "hosts": hosts,
    }


def phase(cluster: Cluster, airflow: AirflowClient, label: str, commits: int, offset: int, timeout: float) -> dict:
    pushed = []
    t_first = time.time()
    for i in range(commits):
        name = REPOSITORIES[i % len(REPOSITORIES)]
        # A learning rate of its own: new model inputs, so every run trains (no reuse of an earlier model).
        sha = cluster.commit_param(
            cluster.repos[name], "train.learning_rate", round(0.003 + 0.0001 * (offset + i + 1), 5)
        )
        pushed.append((name, sha))
    log(f"{label}: pushed {commits} commits: {[(n, s[:10]) for n, s in pushed]}")
    deadline = time.monotonic() + timeout
    runs = [finish(airflow, name, sha, deadline) for name, sha in pushed]
    for run in runs:
        log(f"{label}: {run['run_id']} {run['state']} in {run['end'] - run['start']:.0f} s on {run['hosts']}")
    seconds = max(r["end"] for r in runs) - t_first
    return {
        "label": label,
        "commits": commits,
        "seconds": seconds,
        "runs_per_hour": commits * 3600 / seconds,
        "succeeded": sum(r["state"] == "success" for r in runs),
        "runs": runs,
        "hosts": sorted({h for r in runs for h in r["hosts"]}),
        "load_avg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=4, help="commits per phase, alternating over 2 repositories")
    parser.add_argument("--phase-timeout", type=float, default=600.0, help="seconds a phase may take")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        sys.exit("the benchmark needs: " + "; ".join(missing))
    env_info = begin("pipeline_throughput")
    results: dict = {"environment": env_info, "args": vars(args), "phases": []}
    t_start = time.monotonic()
    cluster = Cluster()
    try:
        cluster.start(report=log)
        airflow = AirflowClient(cluster.url("api"), retry_seconds=120)
        airflow.wait_for_dag(timeout=180)
        deadline = time.monotonic() + args.phase_timeout
        warm = [finish(airflow, name, repo["commit_sha"], deadline) for name, repo in cluster.repos.items()]
        log(
            f"warm-up: initial heads {[(r['run_id'], r['state']) for r in warm]} after "
            f"{time.monotonic() - t_start:.0f} s"
        )
        cluster.kill("worker-b")
        results["phases"].append(phase(cluster, airflow, "1 worker", args.commits, 0, args.phase_timeout))
        cluster.start_worker("worker-b", cluster.watches)
        results["phases"].append(phase(cluster, airflow, "2 workers", args.commits, args.commits, args.phase_timeout))
    finally:
        kept = cluster.stop(keep_logs=len(results["phases"]) < 2)
        if kept:
            print(f"logs of the cluster's processes kept in {kept}")
        log(f"cluster stopped; wall time {time.monotonic() - t_start:.0f} s")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "pipeline_throughput.json").write_text(json.dumps(results, indent=2, default=str))
    report(results)


def report(results: dict) -> None:
    one, two = results["phases"]
    print("\nPipeline throughput, same cluster, same run: first push -> every run of the phase finished\n")
    print(
        "| Celery workers (concurrency 1 each) | runs | succeeded | seconds | runs per hour | ratio vs 1 worker "
        "| hosts seen | load avg at end |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in (one, two):
        print(
            f"| {p['label']} | {p['commits']} | {p['succeeded']} | {p['seconds']:.0f} | {p['runs_per_hour']:.1f} "
            f"| {p['runs_per_hour'] / one['runs_per_hour']:.2f} | {', '.join(p['hosts'])} | {p['load_avg']:.0f} |"
        )


if __name__ == "__main__":
    main()
