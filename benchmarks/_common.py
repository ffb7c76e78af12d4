"""What every benchmark needs: free loopback ports and a fresh gitops-ml home of its own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.helpers import free_port

__all__ = ["OUT_DIR", "ROOT", "free_port", "fresh_home"]

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
