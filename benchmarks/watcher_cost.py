"""The watcher's cost per watched repository on ONE triggerer (issue 14, item 5).

    python -m benchmarks.watcher_cost [--counts 1,10,100] [--window 60] [--warmup 15]

Starts a real Airflow (SQLite metadata DB, LocalExecutor): ``airflow db migrate``, then
``api-server``, ``scheduler``, ``dag-processor`` and one ``triggerer``, each its own process, on
a DAGs folder holding ``dags/gitops_ml_watch.py``.  The watch file names N local bare
repositories (the "remotes", read with ``git ls-remote``), all at the default poll interval.
Each watcher's cursor is preset to its repository's head (``AIRFLOW_VAR_<cursor key>`` in the
scheduler's environment, where the tasks run), so its first sensor checks once, finds nothing
new and defers: the steady state of a watched repository without pushes.

N grows 1 -> 10 -> 100 on the same stack (the watch file is rewritten, the dag-processor adds the
new watcher DAGs).  For each N, once N sensors are DEFERRED and N triggers exist, and after
``--warmup`` seconds, a ``--window`` of seconds is measured on the triggerer only:

- CPU: user + system seconds of the triggerer's processes (the ``airflow triggerer`` process, its
  trigger-runner child and its log server), children included (the ``git`` processes they reaped),
  per minute;
- memory: RSS at the end of the window of the ``airflow triggerer`` process, and the sum over all its
  long-lived processes (itself, its trigger runner, and its log server ``airflow serve-logs``, started
  by default; pages they share are counted once per process);
- ``git ls-remote`` calls per minute: a ``git`` wrapper first on the triggerer's PATH only logs
  each call, then runs the real git;
- metadata-DB statements per second: a ``sitecustomize`` on the triggerer's PYTHONPATH only adds
  a SQLAlchemy ``before_cursor_execute`` listener to every engine and counts the statements each
  process sends (every ``SELECT``/``INSERT``/``UPDATE``/``DELETE``, ``BEGIN``/``COMMIT`` not
  counted: they are not cursor executions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from benchmarks._common import OUT_DIR, ROOT, begin, free_port, fresh_home, log
from tests.helpers import git

SITECUSTOMIZE = '''"""Benchmark only (benchmarks/watcher_cost.py): count the SQL statements this process sends."""
import os
import threading

_DIR = os.environ.get("BENCH_SQL_COUNT_DIR")
if _DIR:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _count = [0]

    @event.listens_for(Engine, "before_cursor_execute")
    def _counted(*_args, **_kwargs):
        _count[0] += 1

    def _flush_forever():
        import time
        while True:
            path = os.path.join(_DIR, str(os.getpid()))
            with open(path + ".tmp", "w") as out:
                out.write(str(_count[0]))
            os.replace(path + ".tmp", path)
            time.sleep(0.5)

    def _start():
        threading.Thread(target=_flush_forever, daemon=True).start()

    _start()
    os.register_at_fork(after_in_child=_start)  # a forked child counts on in a file of its own
'''

GIT_WRAPPER = """#!/bin/sh
# Benchmark only (benchmarks/watcher_cost.py): log each git call of the triggerer, then run git.
printf '%s %s\\n' "$(date +%s.%N)" "$*" >> "{log}"
exec "{git}" "$@"
"""


def make_remote(path: Path, scratch: Path) -> str:
    """A bare repository with one commit of its own (its name in the file: SHAs differ); its head."""
    work = scratch / path.name
    work.mkdir(parents=True)
    git(work, "init", "-q", "-b", "main")
    (work / "params.yaml").write_text(f"# watched repository {path.name}\n")
    git(work, "add", "params.yaml")
    git(work, "commit", "-qm", f"initial ({path.name})")
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(path)], check=True)
    shutil.rmtree(work)
    return git(path, "rev-parse", "HEAD")


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_sample(pid: int) -> dict[int, float]:
    out = {}
    for proc in tree(pid):
        try:
            if proc.name() == "git":
                continue  # short-lived: its time is counted in its parent's children_* once reaped
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return out


def rss_mib(pid: int) -> tuple[float, float]:
    """(RSS of the ``airflow triggerer`` process, sum over it and its long-lived children) in MiB."""
    total, main = 0, 0
    for proc in tree(pid):
        try:
            if proc.name() == "git":
                continue
            rss = proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        if proc.pid == pid:
            main = rss
    return main / 2**20, total / 2**20


def sql_count(folder: Path) -> int:
    total = 0
    for path in folder.iterdir():
        if path.suffix != ".tmp":
            try:
                total += int(path.read_text() or 0)
            except (ValueError, FileNotFoundError):
                pass
    return total


def ls_remote_calls(git_log: Path, since: float, until: float) -> int:
    if not git_log.exists():
        return 0
    count = 0
    for line in git_log.read_text().splitlines():
        stamp, _, args = line.partition(" ")
        if "ls-remote" in args.split()[:1] and since <= float(stamp) < until:
            count += 1
    return count


def waiting(db: Path) -> tuple[int, int]:
    """(watcher sensors DEFERRED, triggers in the trigger table), read straight from SQLite."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        deferred = conn.execute(
            "SELECT count(*) FROM task_instance WHERE state = 'deferred' AND task_id = 'wait_for_commit'"
        ).fetchone()[0]
        triggers = conn.execute("SELECT count(*) FROM trigger").fetchone()[0]
    return deferred, triggers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1,10,100", help="numbers of watched repositories, ascending")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured per count")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds waited once all sensors deferred")
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    env_info = begin("watcher_cost")

    home = fresh_home("watcher-cost-", free_port())
    from gitops_ml import stack
    from gitops_ml.config import Settings
    from gitops_ml.watch import Watch

    poll_interval = Watch.model_fields["poll_interval"].default
    settings = Settings.from_env()
    project = home / "project"
    (project / "dags").mkdir(parents=True)
    (project / "dags" / "gitops_ml_watch.py").symlink_to(ROOT / "dags" / "gitops_ml_watch.py")
    (project / "plugins").mkdir()
    remotes, heads = home / "remotes", {}
    for i in range(max(counts)):
        name = f"repo{i:03d}"
        heads[name] = make_remote(remotes / f"{name}.git", home / "scratch")
    log(f"{len(heads)} bare repositories under {remotes}")

    # The triggerer's instruments: a git wrapper first on its PATH, a sitecustomize on its PYTHONPATH.
    wrapper_dir, site_dir, sql_dir = home / "git-wrapper", home / "site", home / "sql-counts"
    for folder in (wrapper_dir, site_dir, sql_dir):
        folder.mkdir()
    git_log = home / "git-calls.log"
    (wrapper_dir / "git").write_text(GIT_WRAPPER.format(log=git_log, git=shutil.which("git")))
    (wrapper_dir / "git").chmod(0o755)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)

    watch_file = home / "watch.yaml"

    def write_watches(n: int) -> None:
        entries = [
            {
                "name": name,
                "repo_url": str(remotes / f"{name}.git"),
                "branch": "main",
                "policy": "every",
                "retrain_schedule": None,
            }
            for name in list(heads)[:n]
        ]
        tmp = watch_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"repositories": entries}, indent=2))  # JSON is YAML
        tmp.replace(watch_file)

    write_watches(counts[0])
    port = free_port()
    base = {
        **stack.airflow_env(settings, port, project_root=project),
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "GITOPS_ML_WATCH_CONFIG": str(watch_file),
        "PYTHONPATH": str(ROOT),
    }
    cursors = {
        f"AIRFLOW_VAR_{Watch(name=n, repo_url=str(remotes / f'{n}.git')).cursor_key.upper()}": sha
        for n, sha in heads.items()
    }
    db = Path(base["AIRFLOW_HOME"]) / "airflow.db"
    airflow = str(Path(sys.executable).parent / "airflow")
    envs = {
        "api-server": base,
        "scheduler": {**base, **cursors},
        "dag-processor": base,
        "triggerer": {
            **base,
            "PATH": os.pathsep.join([str(wrapper_dir), base["PATH"]]),
            "PYTHONPATH": os.pathsep.join([str(site_dir), str(ROOT)]),
            "BENCH_SQL_COUNT_DIR": str(sql_dir),
        },
    }
    argvs = {
        "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        "scheduler": [airflow, "scheduler"],
        "dag-processor": [airflow, "dag-processor"],
        "triggerer": [airflow, "triggerer"],
    }
    print(
        f"stack: SQLite {db}, API http://127.0.0.1:{port}, watch file {watch_file}, "
        f"poll interval {poll_interval:g} s (default), counts {counts}",
        flush=True,
    )

    results: dict = {"environment": env_info, "args": vars(args), "poll_interval_s": poll_interval, "rows": []}
    t_start = time.monotonic()
    pids: dict[str, int] = {}
    try:
        migrated = subprocess.run(
            [airflow, "db", "migrate"], check=False, env={**os.environ, **base}, capture_output=True, text=True
        )
        if migrated.returncode:
            raise RuntimeError(f"airflow db migrate failed: {migrated.stderr[-3000:]}")
        for name, argv in argvs.items():
            pids[name] = stack.start(settings, name, argv, envs[name])
        stack.wait_http(
            f"http://127.0.0.1:{port}/api/v2/monitor/health", 300, "Airflow", home / "stack" / "api-server.log"
        )
        log(f"Airflow up after {time.monotonic() - t_start:.0f} s")
        for n in counts:
            write_watches(n)
            t0 = time.monotonic()
            while True:
                if time.monotonic() - t0 > args.settle_timeout:
                    raise TimeoutError(
                        f"{n} watchers not all deferred within {args.settle_timeout:.0f} s "
                        f"(deferred, triggers: {waiting(db)}); see {home / 'stack'}"
                    )
                for name, pid in pids.items():
                    if not psutil.pid_exists(pid):
                        raise RuntimeError(f"airflow {name} exited; see {home / 'stack' / (name + '.log')}")
                deferred, triggers = waiting(db)
                if deferred >= n and triggers >= n:
                    break
                time.sleep(2)
            log(
                f"N={n}: {deferred} sensors deferred, {triggers} triggers after {time.monotonic() - t0:.0f} s; "
                f"warm-up {args.warmup:g} s"
            )
            time.sleep(args.warmup)
            trig = pids["triggerer"]
            cpu0, sql0, wall0, mono0 = cpu_sample(trig), sql_count(sql_dir), time.time(), time.monotonic()
            time.sleep(args.window)
            cpu1, sql1, wall1, mono1 = cpu_sample(trig), sql_count(sql_dir), time.time(), time.monotonic()
            minutes = (mono1 - mono0) / 60
            cpu = sum(cpu1[p] - cpu0[p] for p in cpu1 if p in cpu0)
            main_rss, total_rss = rss_mib(trig)
            calls = ls_remote_calls(git_log, wall0, wall1)
            end_state = waiting(db)
            row = {
                "repositories": n,
                "window_s": mono1 - mono0,
                "cpu_s_per_min": cpu / minutes,
                "rss_mib_triggerer": main_rss,
                "rss_mib_total": total_rss,
                "ls_remote_per_min": calls / minutes,
                "sql_per_s": (sql1 - sql0) / (mono1 - mono0),
                "deferred_at_end": end_state[0],
                "triggers_at_end": end_state[1],
                "load_avg": os.getloadavg()[0],
                "processes": len(cpu1),
            }
            results["rows"].append(row)
            log(f"N={n}: {json.dumps(row)}")
    finally:
        for name in reversed(list(pids)):
            stack.stop(settings, name)
        log(f"Airflow stopped; wall time {time.monotonic() - t_start:.0f} s")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "watcher_cost.json").write_text(json.dumps(results, indent=2, default=str))
    report(results)


def report(results: dict) -> None:
    rows = results["rows"]
    base = rows[0]
    print(
        f"\nWatcher cost on one triggerer, poll interval {results['poll_interval_s']:g} s, "
        f"{results['args']['window']:g} s window per N ({datetime.now(UTC):%Y-%m-%d})\n"
    )
    print(
        "| watched repositories | triggerer CPU (s per min) | CPU added per repository vs first row "
        "| RSS `airflow triggerer` / all its processes (MiB) | `git ls-remote` per min "
        "| metadata-DB statements per s | CPU ratio vs first row | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        added = r["repositories"] - base["repositories"]
        marginal = f"{(r['cpu_s_per_min'] - base['cpu_s_per_min']) / added:.4f}" if added else "-"
        print(
            f"| {r['repositories']} | {r['cpu_s_per_min']:.2f} | {marginal} | "
            f"{r['rss_mib_triggerer']:.0f} / {r['rss_mib_total']:.0f} | {r['ls_remote_per_min']:.1f} | "
            f"{r['sql_per_s']:.2f} | {r['cpu_s_per_min'] / base['cpu_s_per_min']:.1f} | {r['load_avg']:.0f} |"
        )


if __name__ == "__main__":
    main()
