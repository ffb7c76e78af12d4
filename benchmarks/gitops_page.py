"""GitOps page with a long history: how fast it answers, and what its polling costs the API server.

Seeds 1,000 commits of history (``tests/history_seed.py``: a real Git repository, one pipeline
run with its task instances and XComs per commit in a real Airflow DB, one model version per
commit in a real MLflow registry, the run records), then serves Airflow's own API app (the plugin
loaded from ``plugins/``, the simple auth manager with authentication on) with uvicorn on a free
loopback port and measures over HTTP, a JWT in the request like the UI's cookie:

- ``/gitops-ml/api/history`` for page 1, a middle page and the last page (25 rows a page), and
  the page itself (``/gitops-ml/ui``);
- baseline, in the same run and server: Airflow's own run list of the DAG,
  ``/api/v2/dags/gitops_ml_pipeline/dagRuns?limit=25`` (what the UI's Runs tab loads);
- polling: one open page asks every 15 s when idle and every 3 s while a run is going (the
  page's own timers); with the measured server CPU seconds per history request that gives the
  share of one core that each open page costs;
- the first request after the API server starts (``--idle`` seconds after it is healthy, as a user
  opens the page after a restart): once with the plugin's background warm-up switched off (what the
  first request used to pay: MLflow's import) and once with it, each beside the first request of
  Airflow's own run list on the same server.

    .venv/bin/python -m benchmarks.gitops_page [--commits 1000] [--repeat 15] [--idle 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, free_port, fresh_home

IDLE_POLL_S = 15.0
RUNNING_POLL_S = 3.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds between healthy and the first request")
    args = parser.parse_args()

    home = fresh_home("gitops-page-", free_port())
    airflow_home = Path(tempfile.mkdtemp(prefix="airflow-", dir=home))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",  # noqa: E501
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "bench:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": "benchmark-jwt-secret-0123456789abcdef0123456789abcdef0123",
            "GITOPS_ML_REPO_URL": str(home / "model-repo"),
            "GIT_PYTHON_REFRESH": "quiet",
        }
    )
    (home / "passwords.json").write_text('{"bench": "bench-password"}')
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
    subprocess.run([airflow, "dags", "reserialize"], check=True, capture_output=True)  # the DAG the baseline lists

    import httpx

    from gitops_ml.config import Settings
    from tests.history_seed import seed

    settings = Settings.from_env()
    started = time.monotonic()
    seeded = seed(settings, args.commits)
    print(
        f"seeded {args.commits} commits (runs, task instances, XComs, model versions, records) in "
        f"{time.monotonic() - started:.1f} s; champion version {seeded['champion']}",
        flush=True,
    )

    run_list = "/api/v2/dags/gitops_ml_pipeline/dagRuns?limit=25&order_by=-run_after"
    first_page = "/gitops-ml/api/history?page=1&per_page=25"
    firsts = {}
    for warm_up in (False, True):
        server, base = _serve(home, warm_up)
        try:
            token = httpx.post(base + "/auth/token", json={"username": "bench", "password": "bench-password"})
            http = httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=120
            )
            time.sleep(args.idle)
            firsts[warm_up] = {path: _timed(http, path) for path in (run_list, first_page)}
        except BaseException:
            server.terminate()
            raise
        if not warm_up:
            server.terminate()
            server.wait(30)
    try:  # the server with the warm-up goes on
        last_page = -(-args.commits // 25)
        targets = {
            "baseline: Airflow run list (25 runs)": run_list,
            "GitOps page HTML": "/gitops-ml/ui",
            "GitOps history, page 1 (25 rows)": first_page,
            f"GitOps history, page {last_page // 2}": f"/gitops-ml/api/history?page={last_page // 2}&per_page=25",
            f"GitOps history, page {last_page} (oldest)": f"/gitops-ml/api/history?page={last_page}&per_page=25",
        }
        for path in targets.values():  # warm: imports, first queries
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        [first] = http.get(targets["GitOps history, page 1 (25 rows)"]).json()["sections"]
        assert first["total"] == args.commits and len(first["rows"]) == 25
        assert first["now_serving"]["model_version"] == seeded["champion"]
        medians = {}
        cpu_before = _cpu_seconds(server.pid)
        history_requests = 0
        for _ in range(args.repeat):
            for name, path in targets.items():
                t0 = time.perf_counter()
                assert http.get(path).status_code == 200
                medians.setdefault(name, []).append(time.perf_counter() - t0)
                history_requests += "api/history" in path
        cpu_all = _cpu_seconds(server.pid) - cpu_before
        # CPU of the history requests alone: the same loop over page 1 only.
        cpu_before = _cpu_seconds(server.pid)
        for _ in range(args.repeat):
            http.get(targets["GitOps history, page 1 (25 rows)"])
        cpu_per_history = (_cpu_seconds(server.pid) - cpu_before) / args.repeat
    finally:
        server.terminate()
        server.wait(30)

    baseline = statistics.median(medians["baseline: Airflow run list (25 runs)"])
    print(f"\n{args.commits} commits of history, median of {args.repeat} requests each, 2-core machine")
    print(f"{'request':45s} {'median ms':>10s} {'p90 ms':>8s} {'x baseline':>10s}")
    for name, timings in medians.items():
        ordered = sorted(timings)
        p90 = ordered[max(0, int(0.9 * len(ordered)) - 1)]
        print(
            f"{name:45s} {1000 * statistics.median(ordered):10.1f} {1000 * p90:8.1f} "
            f"{statistics.median(ordered) / baseline:10.2f}"
        )
    print(
        f"\nAPI-server CPU per history request (page 1): {1000 * cpu_per_history:.1f} ms "
        f"(all requests above: {cpu_all:.1f} s)"
    )
    print(f"\nfirst request after the API server started ({args.idle:.0f} s after it was healthy)")
    print(f"{'server':40s} {'run list ms':>12s} {'history ms':>11s} {'x run list':>10s}")
    for warm_up, label in ((False, "before: no warm-up (first request imports)"), (True, "after: warm-up at start")):
        timings = firsts[warm_up]
        print(
            f"{label:40s} {1000 * timings[run_list]:12.1f} {1000 * timings[first_page]:11.1f} "
            f"{timings[first_page] / timings[run_list]:10.2f}"
        )
    print(f"first history request, before / after: {firsts[False][first_page] / firsts[True][first_page]:.1f}x\n")
    for label, interval in (("idle", IDLE_POLL_S), ("a run going", RUNNING_POLL_S)):
        rate = 1 / interval
        print(
            f"one open page, {label}: {rate:.3f} requests/s -> {100 * rate * cpu_per_history:.2f} % of one core "
            f"({int(1 / (rate * cpu_per_history))} open pages to fill one core)"
        )
    return 0


def _serve(home: Path, warm_up: bool) -> tuple[subprocess.Popen, str]:
    """Airflow's API app (the plugin loaded) under uvicorn on a free port, once healthy; ``warm_up``
    False replaces the plugin's background warm-up by nothing (the behaviour before it existed)."""
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER.format(port=port, warm_up=warm_up)],
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=open(home / f"api-{'warm' if warm_up else 'cold'}.log", "wb"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/api/v2/monitor/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"the API server on {base} was not healthy within 180 s")


def _timed(http, path: str) -> float:
    started = time.perf_counter()
    answer = http.get(path)
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    return time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SERVER = """
import contextlib
import uvicorn
from airflow.api_fastapi.app import create_app
from gitops_ml.airflow import gitops_view

if not {warm_up}:
    @contextlib.asynccontextmanager
    async def no_warm_up(app):
        yield

    gitops_view.warm_up_in_background = no_warm_up  # read when the plugin's app is created, below
uvicorn.run(create_app(apps="core"), host="127.0.0.1", port={port}, log_level="warning")
"""


if __name__ == "__main__":
    raise SystemExit(main())
