"""One settings object, read from the environment (pydantic-settings).

Every gitops-ml environment variable is a field of :class:`Settings`, declared once with its
default; the field ``home`` is ``GITOPS_ML_HOME``, and a field read from a variable outside the
``GITOPS_ML_`` prefix (``MLFLOW_TRACKING_URI``, ``ES_*``, ``AIRFLOW_API_*``) names it as its alias.
An empty variable counts as unset.  Every value has an embedded default that puts all state under
one directory (``GITOPS_ML_HOME``, default ``~/.gitops-ml``), so the demo needs no server.  The same
names configure a cluster (see ``docker-compose.yml``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gitops_ml.errors import GitopsMLError
from gitops_ml.refs import redact

ENV_PREFIX = "GITOPS_ML_"


class SettingsError(GitopsMLError):
    """An environment variable has a value of the wrong type (the message names the variable)."""


class Settings(BaseSettings):
    """Where gitops-ml keeps its state and which services it talks to.

    ``Settings()`` (or :meth:`from_env`) reads the environment; keyword arguments win over it.
    Passwords, tokens and keys are ``SecretStr`` (``.get_secret_value()`` where they are used), and
    ``repr``/``str`` mask the credentials a URL carries (``https://user:token@host``), so printing or
    logging the settings shows no secret.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, validate_by_name=True, extra="forbid"
    )

    home: Path = Field(
        default_factory=lambda: Path.home() / ".gitops-ml",
        description="root of all local state (git mirrors, work trees, MLflow store, logs)",
    )
    repo_url: str = Field("", description="model repository to track (any URL git understands)")
    branch: str = Field("main", description="tracked branch")
    model_name: str = Field("gitops-ml-classifier", description="registered model name in MLflow")
    tracking_uri: str = Field(
        "",
        validation_alias="MLFLOW_TRACKING_URI",
        validate_default=True,
        description="MLflow tracking URI (default: SQLite file under home)",
    )
    artifact_root: str = Field(
        "", validate_default=True, description="where MLflow stores artifacts for experiments we create"
    )
    experiment_name: str = Field(
        "gitops-ml", validation_alias="GITOPS_ML_EXPERIMENT", description="MLflow experiment holding the training runs"
    )
    serving_url: str = Field(
        "http://127.0.0.1:8765", description="base URL of the running `gitops-ml serve` (comma-separated for several)"
    )
    serving_token: SecretStr = Field(
        "", validate_default=True, description="shared secret for the server's /admin endpoints"
    )
    trusted_proxies: str = Field("", description="comma-separated reverse proxies whose X-Forwarded-For is read")
    deploy_timeout: float = Field(120.0, description="seconds the deploy step waits for /version to report the SHA")
    mlflow_ui_url: str = Field("http://127.0.0.1:5000", description="MLflow UI the Airflow UI links point to")
    push_notes: bool = Field(False, description="push the refs/notes/gitops-ml note of each run")
    keep_worktrees: int = Field(5, description="work trees of finished runs kept (latest first); -1 keeps all")
    keep_failed_hours: float = Field(24.0, description="hours the work tree of a failed run is kept")
    watch_config: Path | None = Field(None, description="the watch file (default: <home>/watch.yaml)")
    webhook_secret: SecretStr = Field(
        "", validate_default=True, description="webhook secret of a watch without webhook_secret_env"
    )
    spool_max_bytes: int = Field(512 * 1024 * 1024, description="cap of the local log spool")
    log_flush_seconds: float = Field(1.0, description="interval of the live log preview into ES; 0: off")
    ship_wait_seconds: float = Field(60.0, description="how long the last task retries an unreachable ES")
    es_url: str = Field("", validation_alias="ES_URL", description="Elasticsearch for logs and run records")
    es_api_key: SecretStr = Field(
        "", validation_alias="ES_API_KEY", validate_default=True, description="API key for es_url"
    )
    es_username: str = Field("", validation_alias="ES_USERNAME", description="basic-auth user for es_url")
    es_password: SecretStr = Field(
        "", validation_alias="ES_PASSWORD", validate_default=True, description="basic-auth password for es_url"
    )
    es_ca_certs: str = Field("", validation_alias="ES_CA_CERTS", description="CA bundle for an https es_url")
    airflow_api_url: str = Field(
        "", validation_alias="AIRFLOW_API_URL", description="Airflow REST API that `gitops-ml trigger` and `demo` call"
    )
    airflow_api_username: str = Field(
        "", validation_alias="AIRFLOW_API_USERNAME", description="user for Airflow's /auth/token"
    )
    airflow_api_password: SecretStr = Field(
        "",
        validation_alias="AIRFLOW_API_PASSWORD",
        validate_default=True,
        description="password for Airflow's /auth/token",
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return Path(value).expanduser().resolve()

    @field_validator("tracking_uri")
    @classmethod
    def _default_store(cls, value: str, info: ValidationInfo) -> str:
        home = info.data.get("home")
        return value or (f"sqlite:///{home / 'mlflow' / 'mlflow.db'}" if home else "")

    @field_validator("artifact_root")
    @classmethod
    def _default_artifacts(cls, value: str, info: ValidationInfo) -> str:
        home = info.data.get("home")
        return value or (str(home / "mlflow" / "artifacts") if home else "")

    @field_validator("serving_url", "mlflow_ui_url", "airflow_api_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of this process's environment; a value of the wrong type names its variable."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"{env_name(str(e['loc'][0]))} must be {e['msg'].lower().removeprefix('input should be ')}, "
                f"got {e['input']!r}"
                for e in exc.errors(include_url=False)
            )
            raise SettingsError(f"environment: {problems}") from None

    def with_overrides(self, **overrides: object) -> Settings:
        """Return a copy with the non-empty ``overrides`` applied (run conf wins over env); a secret
        given as plain text is wrapped as ``SecretStr`` like one read from the environment."""
        update = {k: v for k, v in overrides.items() if v not in (None, "")}
        for name, value in update.items():
            if isinstance(value, str) and Settings.model_fields[name].annotation is SecretStr:
                update[name] = SecretStr(value)
        return self.model_copy(update=update)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """The fields ``repr`` and ``str`` show: a URL's credentials masked (``SecretStr`` masks itself)."""
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) else value

    @property
    def serving_urls(self) -> list[str]:
        """Every server to converge (``GITOPS_ML_SERVING_URL`` may list several, comma-separated)."""
        return [u.strip().rstrip("/") for u in self.serving_url.split(",") if u.strip()]

    @property
    def watch_config_path(self) -> Path:
        """The watch file: ``GITOPS_ML_WATCH_CONFIG``, else ``<home>/watch.yaml``."""
        return self.watch_config or self.home / "watch.yaml"

    @property
    def airflow_home(self) -> Path:
        """``AIRFLOW_HOME`` of the embedded stack, and of the CLI when it imports Airflow."""
        return self.home / "airflow"

    @property
    def git_cache_dir(self) -> Path:
        return self.home / "git"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def dvc_cache_dir(self) -> Path:
        """The DVC cache every work tree pulls into (shared by the runs on this machine)."""
        return self.home / "dvc-cache"

    @property
    def records_dir(self) -> Path:
        return self.home / "records"


def env_name(field: str) -> str:
    """The environment variable of a field of :class:`Settings` (``home`` -> ``GITOPS_ML_HOME``)."""
    info = Settings.model_fields[field] if field in Settings.model_fields else None
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else ENV_PREFIX + field.upper()


def environment_variables() -> dict[str, str]:
    """Field -> environment variable, for every setting."""
    return {name: env_name(name) for name in Settings.model_fields}
