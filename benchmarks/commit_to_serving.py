"""Commit-to-serving latency of the demo, with its breakdown per step.

    python -m benchmarks.commit_to_serving [--runs 3]
    python -m benchmarks.commit_to_serving --model-code [--runs 3]

Starts the embedded stack (``airflow standalone``, MLflow UI, model server) on free
loopback ports with its own state folder, makes the demo repository, does one
warm-up run, then ``--runs`` measured runs.  Each: commit a change to
``params.yaml`` -> trigger ``commit__<sha>`` over the REST API -> run succeeds ->
the server's ``/version`` reports the SHA.  The breakdown comes from Airflow's task
instance times; "scheduling overhead" is everything between them.

Baseline, same machine, same run: ``gitops-ml run SHA`` (every step in one fresh
process, no Airflow) on commits of the same kind.  Peak memory of the training
task is its own ``ru_maxrss``, logged by the task as the MLflow metric
``train_peak_rss_mb``.

``--model-code`` measures instead commits that carry ``model/model.py`` against commits
of the same repository without model code (the built-in model), interleaved on one
stack, and prints the ratio (see ``compare_model_code``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks._common import OUT_DIR, free_port, fresh_home

TASKS = ["resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record"]


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait_served(url: str, commit_sha: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(url + "/version", timeout=5)
        if response.status_code == 200 and response.json()["commit_sha"] == commit_sha:
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"server never reported {commit_sha}")


@contextlib.contextmanager
def demo_stack(prefix: str):
    """The demo repository with its gate opened and the embedded stack on free loopback ports, stopped
    on exit; yields ``(settings, repo, urls, client)`` once the pipeline DAG is loaded.

    Every commit is deployed: a learning-rate bump may score a little below the champion, and a NOT
    PROMOTED run would never reach /version (the gate is still evaluated, its work still timed).
    """
    serve_port = free_port()
    home = fresh_home(prefix, serve_port)

    from gitops_ml import demo, stack
    from gitops_ml.airflow.client import AirflowClient
    from gitops_ml.config import Settings

    settings = Settings.from_env()
    repo = home / "demo-repo"
    demo.init_demo(repo, str(home / "dvc-remote"))
    demo.bump_param(repo, "gate.max_accuracy_drop", 1.0, "benchmark: every commit is deployed")
    urls = stack.up(settings, airflow_port=free_port(), mlflow_port=free_port(), serve_port=serve_port)
    try:
        client = AirflowClient(urls["airflow"])
        client.wait_for_dag()
        yield settings, repo, urls, client
    finally:
        stack.down(settings)


def measure_run(client, serving_url: str, settings, commit_sha: str, t_commit: float) -> dict:
    """Trigger ``commit__<sha>`` (committed at ``t_commit``), wait until it succeeded and ``/version``
    reports the SHA; the total, the time of each task and the scheduling overhead between them."""
    from gitops_ml import registry

    run = client.trigger_commit(commit_sha)
    t_created = time.time()
    run = client.wait_for_run(run["dag_run_id"], timeout=900)
    assert run["state"] == "success", run
    t_served = wait_served(serving_url, commit_sha)
    tis = {ti["task_id"]: ti for ti in client.task_instances(run["dag_run_id"])}
    steps = {t: ts(tis[t]["end_date"]) - ts(tis[t]["start_date"]) for t in TASKS}
    total = t_served - t_commit
    training = registry.find_training_run(settings, run["dag_run_id"])
    assert training is not None, f"run {run['dag_run_id']} trained nothing"
    return {
        "commit_sha": commit_sha,
        "total_s": total,
        "trigger_s": t_created - t_commit,
        **steps,
        "scheduling_overhead_s": total - (t_created - t_commit) - sum(steps.values()),
        "train_peak_rss_mb": training.metrics.get("train_peak_rss_mb"),
    }


def compare_model_code(runs: int) -> None:
    """Commits that carry ``model/model.py`` against commits of the same repository without model code
    (gitops-ml's built-in CNN), interleaved in one run on one stack.

    The demo's ``model/model.py`` is the built-in CNN written as user code, so both variants train the
    same architecture on the same data with the same params (but for the learning rate every commit
    bumps): the difference is the model-code path (locate, hash, import from the work tree, the code
    files logged to MLflow).  A built-in commit deletes ``model/`` and bumps the learning rate; a
    model-code commit writes ``model/model.py`` back and bumps it.  The order alternates per pair, the
    first pair is the warm-up.  The gate is opened so that every commit is deployed: the gate decides
    nothing about the cost (evaluate scores the champion either way).
    """
    import shutil

    from gitops_ml import demo

    rows: dict[str, list[dict]] = {"builtin": [], "model_code": []}
    step = 0
    with demo_stack("commit-to-serving-model-code-") as (settings, repo, urls, client):
        for i in range(runs + 1):
            for variant in ("builtin", "model_code") if i % 2 == 0 else ("model_code", "builtin"):
                if variant == "builtin":
                    shutil.rmtree(repo / "model", ignore_errors=True)
                else:
                    (repo / "model").mkdir(exist_ok=True)
                    (repo / "model" / "model.py").write_text(demo.DEMO_MODEL)
                step += 1
                t_commit = time.time()
                commit_sha = demo.bump_param(repo, "train.learning_rate", round(0.003 + 0.0001 * step, 5))
                row = measure_run(client, urls["serving"], settings, commit_sha, t_commit)
                code_hash = httpx.get(urls["serving"] + "/version", timeout=10).json()["model_code_hash"]
                assert bool(code_hash) == (variant == "model_code"), (variant, code_hash)
                rows[variant].append({**row, "model_code_hash": code_hash, "warmup": i == 0})
                print(
                    f"{'warm-up' if i == 0 else 'pair ' + str(i)} {variant:10}: {commit_sha[:12]} served after "
                    f"{row['total_s']:.1f} s",
                    flush=True,
                )

    keys = ["total_s", "trigger_s", *TASKS, "scheduling_overhead_s", "train_peak_rss_mb"]
    med = {v: {k: statistics.median(r[k] for r in rs if not r["warmup"]) for k in keys} for v, rs in rows.items()}
    print(f"\ncommit-to-serving, built-in model vs model/model.py, median of {runs} each (after 1 warm-up pair)")
    print(f"{'step':28} {'built-in':>9} {'model.py':>9} {'ratio':>7}")
    for key in ["trigger_s", *TASKS, "scheduling_overhead_s", "total_s", "train_peak_rss_mb"]:
        builtin, user = med["builtin"][key], med["model_code"][key]
        ratio = f"{user / builtin:7.2f}" if builtin > 0.5 else " " * 7
        print(f"{key.removesuffix('_s'):28} {builtin:9.2f} {user:9.2f} {ratio}")
    ratio = med["model_code"]["total_s"] / med["builtin"]["total_s"]
    print(f"\nratio model.py / built-in, commit -> /version: {ratio:.2f}")
    (OUT_DIR / "commit_to_serving_model_code.json").write_text(json.dumps({"runs": rows, "median": med}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--model-code",
        action="store_true",
        help="compare commits carrying model/model.py with commits using the built-in model, interleaved",
    )
    args = parser.parse_args()
    if args.model_code:
        compare_model_code(args.runs)
        return
    from gitops_ml import demo, stack

    rows = []
    with demo_stack("commit-to-serving-") as (settings, repo, urls, client):
        for i in range(args.runs + 1):
            t_commit = time.time()
            commit_sha = demo.bump_param(repo, "train.learning_rate", round(0.003 + 0.0001 * (i + 1), 5))
            row = {**measure_run(client, urls["serving"], settings, commit_sha, t_commit), "warmup": i == 0}
            rows.append(row)
            print(
                f"{'warm-up' if i == 0 else 'run ' + str(i)}: {commit_sha[:12]} served after {row['total_s']:.1f} s",
                flush=True,
            )
        # Revert of the last commit: same inputs as the one before, so its version is reused, not retrained.
        import git

        previous_sha = rows[-2]["commit_sha"]
        git.Repo(repo).git.revert("--no-edit", "HEAD")
        revert_sha = git.Repo(repo).head.commit.hexsha
        t_revert = time.time()
        run = client.wait_for_run(client.trigger_commit(revert_sha)["dag_run_id"], timeout=900)
        served_version = httpx.get(urls["serving"] + "/version").json()
        revert_s = time.time() - t_revert
        reverted = {
            "revert_sha": revert_sha,
            "seconds": revert_s,
            "state": run["state"],
            "serving_commit": served_version["commit_sha"],
            "expected_commit": previous_sha,
            "skipped": sorted(
                t["task_id"] for t in client.task_instances(run["dag_run_id"]) if t["state"] == "skipped"
            ),
        }
        print(
            f"revert {revert_sha[:12]}: serving the model of {served_version['commit_sha'][:12]} after "
            f"{revert_s:.1f} s, skipped {reverted['skipped']}",
            flush=True,
        )
        # A burst: two commits back to back, the newer triggered first (the worst order for the
        # convergence rule); measured until the head serves and until both runs have settled.
        t_burst = time.time()
        older = demo.bump_param(repo, "train.learning_rate", 0.0051, "burst: older")
        newer = demo.bump_param(repo, "train.learning_rate", 0.0052, "burst: newer")
        burst_runs = [client.trigger_commit(newer), client.trigger_commit(older)]
        t_head_served = wait_served(urls["serving"], newer, timeout=900)
        settled = [client.wait_for_run(r["dag_run_id"], timeout=900) for r in burst_runs]
        t_settled = time.time()
        final = httpx.get(urls["serving"] + "/version").json()["commit_sha"]
        burst = {
            "older": older,
            "newer": newer,
            "head_served_s": t_head_served - t_burst,
            "settled_s": t_settled - t_burst,
            "states": [r["state"] for r in settled],
            "final_serving_is_head": final == newer,
            "older_note": settled[1].get("note"),
        }
        print(
            f"burst of 2: head served after {burst['head_served_s']:.1f} s, both runs settled after "
            f"{burst['settled_s']:.1f} s, head still serving: {burst['final_serving_is_head']}",
            flush=True,
        )
        baseline = []
        for i in range(args.runs):
            commit_sha = demo.bump_param(repo, "train.learning_rate", round(0.002 + 0.0001 * (i + 1), 5))
            t0 = time.time()
            subprocess.run(
                [str(Path(sys.executable).parent / "gitops-ml"), "run", commit_sha],
                check=True,
                capture_output=True,
                env={**os.environ, **stack.airflow_env(settings)},
            )
            baseline.append(wait_served(urls["serving"], commit_sha) - t0)
            print(f"baseline {i + 1}: {commit_sha[:12]} served after {baseline[-1]:.1f} s", flush=True)

    measured = [r for r in rows if not r["warmup"]]
    med = {
        k: statistics.median(r[k] for r in measured)
        for k in ["total_s", "trigger_s", *TASKS, "scheduling_overhead_s", "train_peak_rss_mb"]
    }
    base = statistics.median(baseline)
    print(f"\ncommit-to-serving, median of {len(measured)} runs (after 1 warm-up), 2 cores, no GPU")
    print(f"{'step':28} {'seconds':>9}")
    for key in ["trigger_s", *TASKS, "scheduling_overhead_s"]:
        print(f"{key.removesuffix('_s'):28} {med[key]:9.2f}")
    print(f"{'total (commit -> /version)':28} {med['total_s']:9.2f}")
    print(
        f"\nbaseline `gitops-ml run SHA` (no Airflow): {base:.2f} s; ratio airflow/baseline = "
        f"{med['total_s'] / base:.2f}"
    )
    print(f"peak RSS of the train task: {med['train_peak_rss_mb']:.0f} MB")
    print(
        f"revert of the last commit: previous model serving again after {reverted['seconds']:.1f} s "
        f"(reused, skipped: {', '.join(reverted['skipped'])})"
    )
    print(
        f"burst of 2 commits (newer run first): head served after {burst['head_served_s']:.1f} s, both settled "
        f"after {burst['settled_s']:.1f} s, final serving = head: {burst['final_serving_is_head']}"
    )
    (OUT_DIR / "commit_to_serving.json").write_text(
        json.dumps({"runs": rows, "baseline_s": baseline, "median": med, "revert": reverted, "burst": burst}, indent=2)
    )


if __name__ == "__main__":
    main()
