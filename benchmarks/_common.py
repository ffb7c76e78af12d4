"""What every benchmark needs: free loopback ports, a fresh gitops-ml home of its own, the machine and
command it ran on, time-stamped progress lines."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.helpers import free_port

__all__ = ["OUT_DIR", "ROOT", "begin", "environment", "free_port", "fresh_home", "log"]

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"


def fresh_home(prefix: str, serve_port: int) -> Path:
    """A new ``GITOPS_ML_HOME`` under ``benchmarks/out`` with embedded defaults, exported to this process."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=prefix, dir=OUT_DIR))
    os.environ.update(
        {
            "GITOPS_ML_HOME": str(home),
            "GITOPS_ML_REPO_URL": str(home / "demo-repo"),
            "GITOPS_ML_SERVING_URL": f"http://127.0.0.1:{serve_port}",
        }
    )
    for key in ("MLFLOW_TRACKING_URI", "GITOPS_ML_ARTIFACT_ROOT"):
        os.environ.pop(key, None)
    return home


def log(msg: str) -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(benchmark: str) -> dict:
    """The machine, the versions and the command of a run of ``python -m benchmarks.<benchmark>``."""
    from importlib.metadata import version

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "airflow": version("apache-airflow"),
        "git": subprocess.run(["git", "--version"], capture_output=True, text=True, check=False).stdout.strip(),
        "command": f"python -m benchmarks.{benchmark} " + " ".join(sys.argv[1:]),
    }


def begin(benchmark: str) -> dict:
    """The start of a benchmark that starts processes: SIGTERM becomes ``SystemExit``, so its ``finally``
    stops them; its environment printed and returned (for the results file)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env_info = environment(benchmark)
    for key, value in env_info.items():
        print(f"{key}: {value}")
    return env_info
