"""One settings object, read from the environment.

Every value has an embedded default that puts all state under one directory
(``GITOPS_ML_HOME``, default ``~/.gitops-ml``), so the demo needs no server.
The same names configure a cluster (see ``docker-compose.yml``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Where gitops-ml keeps its state and which services it talks to.

    :param home: root of all local state (git mirrors, work trees, MLflow store, logs).
    :param repo_url: model repository to track (any URL git understands).
    :param branch: tracked branch.
    :param model_name: registered model name in MLflow.
    :param tracking_uri: MLflow tracking URI (default: SQLite file under ``home``).
    :param artifact_root: where MLflow stores artifacts for experiments we create.
    :param experiment_name: MLflow experiment holding the training runs.
    :param serving_url: base URL of the running ``gitops-ml serve`` process (comma-separated for several).
    :param serving_token: shared secret for the server's ``/admin`` endpoints (optional).
    :param deploy_timeout: seconds the deploy step waits for ``/version`` to report the new SHA.
    :param mlflow_ui_url: MLflow UI that links from the Airflow UI point to.
    :param push_notes: push the ``refs/notes/gitops-ml`` note of each run to the model repository.
    :param keep_worktrees: work trees of finished runs kept under ``home/work`` (latest first); -1 keeps all.
    :param keep_failed_hours: hours the work tree of a failed run is kept for inspection.
    """

    home: Path
    repo_url: str = ""
    branch: str = "main"
    model_name: str = "gitops-ml-classifier"
    tracking_uri: str = ""
    artifact_root: str = ""
    experiment_name: str = "gitops-ml"
    serving_url: str = "http://127.0.0.1:8765"
    serving_token: str = field(default="", repr=False)
    deploy_timeout: float = 120.0
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    push_notes: bool = False
    keep_worktrees: int = 5
    keep_failed_hours: float = 24.0

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("GITOPS_ML_HOME", str(Path.home() / ".gitops-ml"))).expanduser().resolve()
        return cls(
            home=home,
            repo_url=_env("GITOPS_ML_REPO_URL", ""),
            branch=_env("GITOPS_ML_BRANCH", "main"),
            model_name=_env("GITOPS_ML_MODEL_NAME", "gitops-ml-classifier"),
            tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"),
            artifact_root=_env("GITOPS_ML_ARTIFACT_ROOT", str(home / "mlflow" / "artifacts")),
            experiment_name=_env("GITOPS_ML_EXPERIMENT", "gitops-ml"),
            serving_url=_env("GITOPS_ML_SERVING_URL", "http://127.0.0.1:8765").rstrip("/"),
            serving_token=_env("GITOPS_ML_SERVING_TOKEN", ""),
            deploy_timeout=float(_env("GITOPS_ML_DEPLOY_TIMEOUT", "120")),
            mlflow_ui_url=_env("GITOPS_ML_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/"),
            push_notes=_env("GITOPS_ML_PUSH_NOTES", "false").lower() in ("1", "true", "yes"),
            keep_worktrees=int(_env("GITOPS_ML_KEEP_WORKTREES", "5")),
            keep_failed_hours=float(_env("GITOPS_ML_KEEP_FAILED_HOURS", "24")),
        )

    def with_overrides(self, **overrides: object) -> "Settings":
        """Return a copy with the non-empty ``overrides`` applied (run conf wins over env)."""
        return replace(self, **{k: v for k, v in overrides.items() if v not in (None, "")})

    @property
    def serving_urls(self) -> list[str]:
        """Every server to converge (``GITOPS_ML_SERVING_URL`` may list several, comma-separated)."""
        return [u.strip().rstrip("/") for u in self.serving_url.split(",") if u.strip()]

    @property
    def git_cache_dir(self) -> Path:
        return self.home / "git"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def records_dir(self) -> Path:
        return self.home / "records"
