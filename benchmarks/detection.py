"""Commit detection latency of the watcher (issue 3): push -> pipeline run ``commit__<sha>`` exists.

    python -m benchmarks.detection [--pushes 20] [--fast-pushes 20] [--fast-interval 5]
                                   [--webhook-pushes 20] [--idle 30] [--seed 0]

Starts ``airflow standalone`` (the embedded stack's Airflow: SQLite, LocalExecutor,
parallelism 4) on a free loopback port with its own state folder and a temporary DAGs
folder holding links to ``dags/gitops_ml_pipeline.py`` and ``dags/gitops_ml_watch.py`` plus
one benchmark-only file, ``bench_poke_watch.py``: the same watcher with the sensor in poke
mode (``GitCommitSensor(deferrable=False, mode="poke")``), the baseline.  MLflow and the
model server are not started: the pipeline DAG stays paused, so its runs are only created.

Each watcher watches its own local repository (the "remote" is that path, read with
``git ls-remote``) and has its own cursor (one watch entry each), so none races another
for a commit.  DAGs are created paused; each phase unpauses only its two watchers:

1. default poll interval (30 s): ours (deferrable) and the poke baseline side by side,
   ``--pushes`` commits each.  Before each push the watcher must be waiting again (its new
   sensor deferred / running), then a random pause uniform in [0, interval) so a push lands
   at a random point of the poll cycle (a push right after re-arming would always wait a
   whole interval; one before re-arming would be seen by the first check at once).
2. idle: ``--idle`` seconds without pushes, sampled every second: task instances of each
   watcher RUNNING (holding an executor slot) vs DEFERRED, and ``default_pool``'s slots.
3. webhook: ``--webhook-pushes`` commits, each followed by a signed GitHub-style push
   delivery to ``POST /gitops-ml/webhooks/<watch>``; random 0-2 s pause between pushes.
   Our 30 s poller keeps running, as in a real deployment.
4. short poll interval (``--fast-interval``): ours vs poke again, ``--fast-pushes`` each.

Latency = the commit is made in the watched repository -> ``GET
/api/v2/dags/gitops_ml_pipeline/dagRuns/commit__<sha>`` answers 200 (polled every 0.1 s).
Also per push: when the watcher's sensor task ended (Airflow's task instance end date), to
split waiting for the next check from the work after it (plan, trigger the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks._common import OUT_DIR, ROOT, begin, free_port, fresh_home, log
from gitops_ml.airflow.client import AirflowClient
from gitops_ml.runs import PIPELINE_DAG_ID, run_id_for
from tests.helpers import git, github_push_headers, push_body

OURS, POKE = "gitops_ml_watch__", "bench_poke_watch__"
WEBHOOK_SECRET = "bench-detection-secret"

POKE_DAG = '''"""Benchmark only (written by benchmarks/detection.py): the watcher of dags/gitops_ml_watch.py
with its sensor in poke mode, i.e. holding an executor slot while it waits: the baseline."""

from gitops_ml.airflow.watch_dags import watcher_dag
from gitops_ml.watch import load_watches

for _watch in load_watches():
    if _watch.name.startswith("poke"):
        globals()[f"poke__{_watch.name}"] = watcher_dag(_watch, dag_id=f"bench_poke_watch__{_watch.name}",
                                                        deferrable=False, tags=("benchmark",))
'''


class Abort(Exception):
    pass


STOP = threading.Event()


def make_repo(path: Path) -> str:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    # The repository's name in the first commit: every repository gets SHAs of its own (run ids are
    # commit__<sha> for all watchers alike, so equal SHAs in two repositories would share one run).
    (path / "params.yaml").write_text(f"# benchmark repository {path.name}\ntrain:\n  learning_rate: 0.001\n")
    git(path, "add", "params.yaml")
    git(path, "commit", "-qm", f"initial ({path.name})")
    return git(path, "rev-parse", "HEAD")


def push(repo: Path, i: int) -> tuple[str, float]:
    """Commit a ``params.yaml`` change (a model input: the watcher plans ``train``); (sha, wall time)."""
    (repo / "params.yaml").write_text(
        f"# benchmark repository {repo.name}\ntrain:\n  learning_rate: {0.001 + 0.00001 * i:.5f}\n"
    )
    git(repo, "commit", "-qam", f"bench push {i}")
    t_push = time.time()
    return git(repo, "rev-parse", "HEAD"), t_push


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def pctl(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100)."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Api(AirflowClient):
    """``AirflowClient`` (one per thread) plus the few calls the benchmark needs."""

    def get(self, path: str, **params):
        response = self._http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def run_exists(self, sha: str, watch: str) -> bool:
        return self.get_run(run_id_for(sha, watch=watch)) is not None

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": paused}).raise_for_status()

    def sensors(self, dag_id: str, *states: str, **params) -> list[dict]:
        query = [("task_id", "wait_for_commit"), *(("state", s) for s in states), *((k, v) for k, v in params.items())]
        response = self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/~/taskInstances", params=query)
        response.raise_for_status()
        return response.json()["task_instances"]

    def stop_watcher(self, dag_id: str) -> None:
        """Pause the watcher and fail its active run (its waiting sensor stops)."""
        self.set_paused(dag_id, True)
        for state in ("running", "queued"):
            for run in self.get(f"/api/v2/dags/{dag_id}/dagRuns", state=state)["dag_runs"]:
                self._http.patch(f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}", json={"state": "failed"})


def wait_until(check, timeout: float, what: str, every: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if STOP.is_set():
            raise Abort("stopped")
        if check():
            return time.time()
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def wait_armed(api: Api, dag_id: str, timeout: float = 300) -> None:
    """The watcher waits again: its sensor is deferred (ours) or running in poke mode (baseline)."""
    state = "running" if dag_id.startswith(POKE) else "deferred"
    wait_until(lambda: bool(api.sensors(dag_id, state)), timeout, f"{dag_id} not waiting again", every=0.25)


def measure_polling(
    base_url: str, dag_id: str, repo: Path, pushes: int, interval: float, seed: int, label: str, offset: int
) -> list[dict]:
    api = Api(base_url)
    rng = random.Random(seed)
    rows = []
    for i in range(pushes):
        wait_armed(api, dag_id)
        pause = rng.uniform(0, interval)
        time.sleep(pause)
        sha, t_push = push(repo, offset + i)
        t_run = wait_until(
            lambda sha=sha: api.run_exists(sha, dag_id.split("__", 1)[1]), interval + 240, f"{label}: no run for {sha}"
        )
        done = api.sensors(dag_id, "success", order_by="-end_date", limit=1)
        t_sensor = ts(done[0]["end_date"]) if done else None
        row = {
            "sha": sha,
            "latency_s": t_run - t_push,
            "pause_s": pause,
            "sensor_done_s": (t_sensor - t_push) if t_sensor and t_sensor > t_push else None,
        }
        row["after_sensor_s"] = (t_run - t_sensor) if row["sensor_done_s"] is not None else None
        rows.append(row)
        log(
            f"{label} push {i + 1}/{pushes}: {sha[:10]} detected after {row['latency_s']:.2f} s "
            f"(sensor done +{row['sensor_done_s'] or float('nan'):.2f} s)"
        )
    return rows


def measure_webhook(base_url: str, watch_name: str, repo: Path, pushes: int, seed: int, offset: int) -> list[dict]:
    api = Api(base_url)
    hook = httpx.Client(base_url=base_url, timeout=60)
    rng = random.Random(seed)
    rows = []
    for i in range(pushes):
        before = git(repo, "rev-parse", "HEAD")
        sha, t_push = push(repo, offset + i)
        body = push_body(before, sha, clone_url=str(repo), commits=[sha])
        response = hook.post(
            f"/gitops-ml/webhooks/{watch_name}", content=body, headers=github_push_headers(body, WEBHOOK_SECRET)
        )
        t_response = time.time()
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text[:300]}")
        t_run = wait_until(lambda sha=sha: api.run_exists(sha, watch_name), 120, f"webhook: no run for {sha}")
        created = response.json().get("created", [])
        rows.append(
            {
                "sha": sha,
                "latency_s": t_run - t_push,
                "response_s": t_response - t_push,
                "created_by_webhook": run_id_for(sha, watch=watch_name) in created,
            }
        )
        log(
            f"webhook push {i + 1}/{pushes}: {sha[:10]} run exists after {rows[-1]['latency_s']:.2f} s "
            f"(HTTP 202 after {rows[-1]['response_s']:.2f} s, created by webhook: {rows[-1]['created_by_webhook']})"
        )
        time.sleep(rng.uniform(0, 2))
    return rows


def sample_slots(api: Api, dag_ids: list[str], seconds: int) -> dict:
    samples = {d: {"running": [], "deferred": []} for d in dag_ids}
    pool = {"occupied_slots": [], "running_slots": [], "deferred_slots": []}
    for _ in range(seconds):
        t0 = time.monotonic()
        for dag_id in dag_ids:
            tis = api.get(f"/api/v2/dags/{dag_id}/dagRuns/~/taskInstances", state=["running", "deferred"])
            for state in ("running", "deferred"):
                samples[dag_id][state].append(sum(1 for ti in tis["task_instances"] if ti["state"] == state))
        data = api.get("/api/v2/pools/default_pool")
        for key, values in pool.items():
            values.append(data[key])
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    return {
        "per_dag": {d: {s: statistics.mean(v) for s, v in states.items()} for d, states in samples.items()},
        "default_pool": {k: statistics.mean(v) for k, v in pool.items()},
        "samples": seconds,
    }


def run_pair(
    base_url: str, phase: str, ours: tuple[str, Path], poke: tuple[str, Path], pushes: int, interval: float, seed: int
) -> dict[str, list[dict]]:
    """Ours and the poke baseline measured side by side (one thread each, separate repositories)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {
            "ours": pool.submit(
                measure_polling, base_url, OURS + ours[0], ours[1], pushes, interval, seed, f"{phase} ours", 1000
            ),
            "poke": pool.submit(
                measure_polling, base_url, POKE + poke[0], poke[1], pushes, interval, seed + 1, f"{phase} poke", 1000
            ),
        }
        try:
            return {k: f.result() for k, f in futures.items()}
        except BaseException:
            STOP.set()
            raise


def start_watchers(api: Api, watches: dict[str, tuple[str, Path, str]], names: list[str]) -> None:
    """Unpause the watchers of ``names``; wait for their first run (the current head) and re-arming
    (the scheduler starts the next ``@continuous`` run: ``watch_dags.START_DATE``)."""
    for name in names:
        dag_id, _, _ = watches[name]
        api.wait_for_dag(dag_id, 300)
        api.set_paused(dag_id, False)
    for name in names:
        dag_id, _, head = watches[name]
        wait_until(
            lambda head=head, name=name: api.run_exists(head, name),
            300,
            f"{dag_id}: no run for the initial head",
            every=0.5,
        )
    for name in names:
        wait_armed(api, watches[name][0])
        log(f"{watches[name][0]}: first run done (initial head {watches[name][2][:10]}), waiting for commits")


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": pctl(values, 95),
        "min": min(values),
        "max": max(values),
        "mean": statistics.mean(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=20, help="pushes per watcher at the default poll interval")
    parser.add_argument("--fast-pushes", type=int, default=20, help="pushes per watcher at --fast-interval (0: skip)")
    parser.add_argument("--fast-interval", type=float, default=5.0)
    parser.add_argument("--webhook-pushes", type=int, default=20)
    parser.add_argument("--idle", type=int, default=30, help="seconds of slot sampling without pushes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env_info = begin("detection")  # SIGTERM -> SystemExit, so the `finally` below stops Airflow.

    home = fresh_home("detection-", free_port())
    from gitops_ml import stack
    from gitops_ml.config import Settings
    from gitops_ml.watch import Watch

    default_interval = Watch.model_fields["poll_interval"].default
    settings = Settings.from_env()
    # A project root of our own: the repository's DAG files and plugins, plus the poke baseline.
    project = home / "project"
    (project / "dags").mkdir(parents=True)
    for name in ("gitops_ml_pipeline.py", "gitops_ml_watch.py"):
        (project / "dags" / name).symlink_to(ROOT / "dags" / name)
    (project / "dags" / "bench_poke_watch.py").write_text(POKE_DAG)
    (project / "plugins").symlink_to(ROOT / "plugins")

    entries, watches = [], {}
    fast = f"{args.fast_interval:g}".replace(".", "_")
    for name, interval in [
        ("defer", None),
        ("poke", None),
        (f"defer{fast}", args.fast_interval),
        (f"poke{fast}", args.fast_interval),
    ]:
        repo = home / "repos" / name
        head = make_repo(repo)
        entry = {"name": name, "repo_url": str(repo), "branch": "main", "policy": "every", "retrain_schedule": None}
        if interval is not None:  # the 30 s entries leave poll_interval out: the default
            entry["poll_interval"] = interval
        entries.append(entry)
        watches[name] = ((POKE if name.startswith("poke") else OURS) + name, repo, head)
    config = home / "watch.yaml"
    config.write_text(json.dumps({"repositories": entries}, indent=2))  # JSON is YAML

    port = free_port()
    env = {
        **stack.airflow_env(settings, port, project_root=project),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # each phase unpauses only its watchers
        "GITOPS_ML_WATCH_CONFIG": str(config),
        "GITOPS_ML_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    base_url = f"http://127.0.0.1:{port}"
    print(
        f"stack: `airflow standalone` on {base_url}, DAGs folder {project / 'dags'}, "
        f"watch config {config}, state {home}"
    )
    print(
        f"default poll interval {default_interval:g} s; plan: {args.pushes} + {args.pushes} pushes at "
        f"{default_interval:g} s, {args.idle} s idle sampling, {args.webhook_pushes} webhook pushes, "
        f"{args.fast_pushes} + {args.fast_pushes} pushes at {args.fast_interval:g} s",
        flush=True,
    )

    results: dict = {"environment": env_info, "args": vars(args), "default_interval_s": default_interval}
    t_start = time.monotonic()
    pid = None
    try:
        pid = stack.start(settings, "airflow", [str(Path(sys.executable).parent / "airflow"), "standalone"], env)
        stack.wait_http(base_url + "/api/v2/monitor/health", 300, "Airflow", home / "stack" / "airflow.log")
        api = Api(base_url)
        api.wait_for_dag(PIPELINE_DAG_ID, 300)
        api.set_paused(PIPELINE_DAG_ID, True)  # runs are only created, never executed: we measure detection
        log(f"Airflow up after {time.monotonic() - t_start:.0f} s; {PIPELINE_DAG_ID} paused")

        start_watchers(api, watches, ["defer", "poke"])
        results["default"] = run_pair(
            base_url,
            f"{default_interval:g}s",
            ("defer", watches["defer"][1]),
            ("poke", watches["poke"][1]),
            args.pushes,
            default_interval,
            args.seed,
        )
        wait_armed(api, watches["defer"][0])
        wait_armed(api, watches["poke"][0])
        log(f"idle: sampling task instances and default_pool for {args.idle} s")
        results["idle"] = sample_slots(api, [watches["defer"][0], watches["poke"][0]], args.idle)
        log(f"idle: {json.dumps(results['idle'])}")
        api.stop_watcher(watches["poke"][0])
        if args.webhook_pushes:
            results["webhook"] = measure_webhook(
                base_url, "defer", watches["defer"][1], args.webhook_pushes, args.seed + 2, 2000
            )
        api.stop_watcher(watches["defer"][0])
        if args.fast_pushes:
            start_watchers(api, watches, [f"defer{fast}", f"poke{fast}"])
            results["fast"] = run_pair(
                base_url,
                f"{args.fast_interval:g}s",
                (f"defer{fast}", watches[f"defer{fast}"][1]),
                (f"poke{fast}", watches[f"poke{fast}"][1]),
                args.fast_pushes,
                args.fast_interval,
                args.seed + 3,
            )
            api.stop_watcher(watches[f"defer{fast}"][0])
            api.stop_watcher(watches[f"poke{fast}"][0])
    finally:
        STOP.set()
        if pid:
            stack.stop(settings, "airflow")
            # Anything of the process group still alive (children that outlived the leader): SIGKILL.
            time.sleep(1)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        log(f"Airflow stopped; wall time {time.monotonic() - t_start:.0f} s")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "detection.json").write_text(json.dumps(results, indent=2, default=str))

    report(results, args, default_interval)


def report(results: dict, args, default_interval: float) -> None:
    rows = []

    def add(label: str, interval: str, data: list[dict], base: dict | None) -> dict:
        s = summary([r["latency_s"] for r in data])
        sensor = [r["sensor_done_s"] for r in data if r.get("sensor_done_s") is not None]
        after = [r["after_sensor_s"] for r in data if r.get("after_sensor_s") is not None]
        ratio = f"{s['median'] / base['median']:.2f} / {s['p95'] / base['p95']:.2f}" if base else "1 (baseline)"
        split = f"{statistics.median(sensor):.1f} + {statistics.median(after):.1f}" if sensor and after else "-"
        rows.append(
            f"| {label} | {interval} | {s['n']} | {s['median']:.2f} | {s['p95']:.2f} | "
            f"{s['min']:.2f} / {s['max']:.2f} | {split} | {ratio} |"
        )
        return s

    default = f"{default_interval:g} s (default)"
    base = add("baseline: poke-mode sensor", default, results["default"]["poke"], None)
    add("ours: deferrable sensor", default, results["default"]["ours"], base)
    if results.get("webhook"):
        add("ours: webhook (+ 30 s poller)", "-", results["webhook"], base)
    if results.get("fast"):
        fast_base = add("baseline: poke-mode sensor", f"{args.fast_interval:g} s", results["fast"]["poke"], None)
        add("ours: deferrable sensor", f"{args.fast_interval:g} s", results["fast"]["ours"], fast_base)
    print("\nCommit detection latency: commit in the watched repository -> run commit__<sha> exists (seconds)\n")
    print(
        "| watcher | poll interval | pushes | median | p95 | min / max | sensor done + rest (medians) "
        "| ratio vs baseline (median / p95) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    idle = results["idle"]
    print(f"\nWhile waiting ({idle['samples']} samples, 1/s, no pushes): mean task instances per watcher\n")
    print("| watcher | RUNNING (holds an executor slot) | DEFERRED (in the triggerer) |")
    print("|---|---|---|")
    for dag_id, states in idle["per_dag"].items():
        print(f"| `{dag_id}` | {states['running']:.2f} | {states['deferred']:.2f} |")
    pool = idle["default_pool"]
    print(
        f"\ndefault_pool (both watchers together): occupied {pool['occupied_slots']:.2f}, "
        f"running {pool['running_slots']:.2f}, deferred {pool['deferred_slots']:.2f}"
    )
    if results.get("webhook"):
        created = sum(r["created_by_webhook"] for r in results["webhook"])
        response = statistics.median(r["response_s"] for r in results["webhook"])
        print(
            f"webhook: {created}/{len(results['webhook'])} runs created by the webhook itself; "
            f"HTTP 202 median {response:.2f} s after the commit"
        )


if __name__ == "__main__":
    main()
