"""Parse time of each DAG file, in fresh processes, against the cost of importing ``airflow.sdk`` alone.

    python -m benchmarks.dag_parse [--runs 7]

Each run is a new interpreter that imports ``airflow.sdk`` (what the DAG processor has
loaded anyway), then times ``runpy.run_path`` of the DAG file and lists which heavy
modules (tensorflow, keras, mlflow, dvc) the file pulled in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["tensorflow", "keras", "mlflow", "dvc", "git", "sklearn"]

PROBE = (
    f"HEAVY = {HEAVY!r}\n"
    + """
import json, runpy, sys, time
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
runpy.run_path(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"sdk": t1 - t0, "dag": t2 - t1, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""
)


def measure(dag_file: Path, runs: int) -> dict:
    samples = []
    for _ in range(runs):
        out = (
            subprocess.run(
                [sys.executable, "-c", PROBE, str(dag_file)], check=True, capture_output=True, text=True, cwd=ROOT
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        samples.append(json.loads(out))
    return {
        "file": dag_file.name,
        "dag_s": statistics.median(s["dag"] for s in samples),
        "sdk_s": statistics.median(s["sdk"] for s in samples),
        "heavy": samples[0]["heavy"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"{'DAG file':34} {'parse (median)':>15} {'import airflow.sdk':>19} {'ratio':>7}  heavy imports")
    for dag_file in sorted((ROOT / "dags").glob("*.py")):
        r = measure(dag_file, args.runs)
        print(
            f"{r['file']:34} {r['dag_s'] * 1000:12.1f} ms {r['sdk_s'] * 1000:16.1f} ms "
            f"{r['dag_s'] / r['sdk_s']:7.3f}  {', '.join(r['heavy']) or 'none'}"
        )


if __name__ == "__main__":
    main()
