"""Disk used by gitops-ml after each of N commits of the digits demo, retention off and on.

    python -m benchmarks.disk [--commits 20] [--train first|all] [--epochs 2]

One demo repository (1,797 digit PNGs, DVC remote) gets ``--commits`` commits that each change
the data a little (two images replaced and one added, pixels from the commit's seed, ``dvc add``
+ ``dvc push``), so every commit has objects of its own.  The first commit runs through
``flow.run_local`` (resolve, check out, dvc pull, train, evaluate, register; no server: its
version is then made champion with ``registry.set_alias``, as the deploy step would); the others
run the steps that touch the disk (resolve, prepare, pull_data) and the real end of a run
(``pipeline.finish``) without training, so the champion stays on the first commit and its data
must stay in the cache (``--train all`` trains and promotes every commit: slower, same disk
picture apart from MLflow's artifacts).  Each commit runs in two homes side by side: the baseline
with retention off (``GITOPS_ML_KEEP_WORKTREES=-1``: nothing is ever removed, the behaviour before
issue 15) and one with the defaults (5 work trees, failed ones 24 h; the cleanup runs at the end of
each run, in ``pipeline.finish``).  After every run ``du -sk`` of ``work``, ``dvc-cache``,
``dvc-cache-site``, ``mlflow`` and the whole home.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._common import OUT_DIR
from tests.helpers import change_demo_images

PARTS = ("work", "dvc-cache", "dvc-cache-site", "mlflow")


def du_kib(path: Path) -> int:
    if not path.exists():
        return 0
    return int(subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--train", choices=["first", "all"], default="first")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs of the demo (training is not measured)")
    args = parser.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="disk-", dir=OUT_DIR))
    repo, remote = base / "demo-repo", str(base / "dvc-remote")
    os.environ.update(
        {
            "GITOPS_ML_HOME": str(base / "off"),
            "GITOPS_ML_REPO_URL": str(repo),
            "GITOPS_ML_KEEP_WORKTREES": "-1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_PYTHON_REFRESH": "quiet",
        }
    )
    for key in ("MLFLOW_TRACKING_URI", "GITOPS_ML_ARTIFACT_ROOT", "GITOPS_ML_KEEP_FAILED_HOURS"):
        os.environ.pop(key, None)

    from gitops_ml import demo, flow, pipeline, registry
    from gitops_ml.config import Settings

    demo.init_demo(repo, remote)
    demo.bump_param(repo, "train.epochs", args.epochs, f"train {args.epochs} epochs")
    off = Settings.from_env()
    on_home = base / "on"
    on = off.with_overrides(
        home=on_home,
        tracking_uri=f"sqlite:///{on_home / 'mlflow' / 'mlflow.db'}",
        artifact_root=str(on_home / "mlflow" / "artifacts"),
        keep_worktrees=5,
        keep_failed_hours=24.0,
    )
    homes = {"off": off, "on": on}
    for settings in homes.values():
        registry.experiment_id(settings)

    rows, seconds = [], {"off": [], "on": []}
    started = time.monotonic()
    for i in range(1, args.commits + 1):
        sha = change_demo_images(repo, remote, i, f"data change {i}")
        row = {"commit": i}
        for name, settings in homes.items():
            t0 = time.monotonic()
            if i == 1 or args.train == "all":
                result = flow.run_local(settings, sha, run_id=f"bench-{i}", deploy_model=False)
                registry.set_alias(settings, result.model_version)  # promoted, as the deploy step does
            else:
                commit = pipeline.resolve(settings, sha).commit
                prepared = pipeline.prepare(settings, commit)
                pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)
                pipeline.finish(settings, commit, f"bench-{i}", None, None, reused=False)
                seconds[name].append(time.monotonic() - t0)
            for part in PARTS:
                row[f"{name}:{part}"] = du_kib(settings.home / part)
            row[f"{name}:total"] = du_kib(settings.home)
            row[f"{name}:trees"] = sum(1 for p in (settings.home / "work").iterdir() if len(p.name) == 40)
        rows.append(row)
        print(
            f"commit {i:2d} {sha[:12]}  off: {row['off:trees']:2d} trees, total {row['off:total'] / 1024:6.1f} MiB"
            f"   on: {row['on:trees']:2d} trees, total {row['on:total'] / 1024:6.1f} MiB",
            flush=True,
        )

    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f}"

    print()
    print(
        f"Disk after each commit (MiB, du -sk), {args.commits} commits of the digits demo, "
        f"wall time {time.monotonic() - started:.0f} s"
    )
    print()
    print(
        "| commit | off: work trees | off: work | off: dvc-cache | off: site cache | off: total "
        "| on: work trees | on: work | on: dvc-cache | on: site cache | on: total |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [str(row["commit"])]
        for name in ("off", "on"):
            cells += [
                str(row[f"{name}:trees"]),
                mib(row[f"{name}:work"]),
                mib(row[f"{name}:dvc-cache"]),
                mib(row[f"{name}:dvc-cache-site"]),
                mib(row[f"{name}:total"]),
            ]
        print("| " + " | ".join(cells) + " |")
    marks = [r for r in rows if r["commit"] in (5, 10, args.commits)] or rows[-1:]
    print()
    print(
        "| after commit | "
        + " | ".join(f"{part} off / on" for part in ("work", "dvc-cache", "dvc-cache-site", "total"))
        + " |"
    )
    print("|---|---|---|---|---|")
    for row in marks:
        print(
            f"| {row['commit']} | "
            + " | ".join(
                f"{mib(row[f'off:{part}'])} / {mib(row[f'on:{part}'])}"
                for part in ("work", "dvc-cache", "dvc-cache-site", "total")
            )
            + " |"
        )
    first, last = rows[len(rows) // 2 - 1], rows[-1]
    span = max(last["commit"] - first["commit"], 1)
    growth = {name: (last[f"{name}:total"] - first[f"{name}:total"]) / span / 1024 for name in ("off", "on")}
    print(
        f"\ntotal growth per commit over commits {first['commit']}-{last['commit']}: off {growth['off']:.2f} MiB, "
        f"on {growth['on']:.2f} MiB; total after {last['commit']} commits: on/off = "
        f"{last['on:total'] / last['off:total']:.2f}"
    )
    if seconds["off"]:
        print(
            f"run without training (resolve, prepare, pull_data, finish), median seconds: off "
            f"{statistics.median(seconds['off']):.2f}, on {statistics.median(seconds['on']):.2f} "
            f"('on' includes the cleanup at the end of each run)"
        )
    print(f"\nhomes kept under {base}")


if __name__ == "__main__":
    main()
