"""``gitops-ml doctor``: is every configured endpoint reachable, and does it accept our secrets?

One line per check: ``OK``, ``FAIL`` (with what to set or fix: the variable, the connection, the
watch field) or ``SKIP`` (not configured, and not needed by this configuration).  The command
exits non-zero when a check of something that is configured (or needed) fails.

Checks: the watch file, the Airflow API (and its token), the metadata database, the Celery
broker, the MLflow tracking server, its artifact store, Elasticsearch, every serving replica,
and for each watched repository its Git remote (with its credentials) and its DVC remote.
Nothing secret is printed: URLs lose their credentials, error texts are redacted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from gitops_ml.config import Settings
from gitops_ml.refs import redact, redact_url

TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | FAIL | SKIP
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix and self.status == "FAIL" else ""
        hint = f" ({self.fix})" if self.fix and self.status == "SKIP" else ""
        return f"{self.status:<4} {self.name}: {redact(self.detail)}{fix}{hint}"


def _run(name: str, fix: str, probe: Callable[[], str]) -> Check:
    """``probe`` returns what it found, or raises: any exception is a failure with ``fix``."""
    try:
        return Check(name, "OK", probe())
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        text = str(exc).strip().splitlines()
        return Check(name, "FAIL", f"{type(exc).__name__}: {text[0] if text else ''}", fix)


def _skip(name: str, hint: str) -> Check:
    return Check(name, "SKIP", "not configured", hint)


def _http_json(url: str, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None):
    response = httpx.get(url, timeout=TIMEOUT, auth=auth, headers=headers)
    if response.status_code >= 400:
        raise RuntimeError(f"HTTP {response.status_code} from {redact_url(url)}: {response.text[:200]}")
    return response.json()


def check_watch_file() -> tuple[Check, list]:
    from gitops_ml import watch  # noqa: PLC0415

    path = watch.config_path()
    try:
        watches = watch.load_watches()
    except Exception as exc:  # noqa: BLE001
        return Check("watch file", "FAIL", str(exc), f"correct {path} (GITOPS_ML_WATCH_CONFIG)"), []
    where = str(path) if path.is_file() else "GITOPS_ML_REPO_URL (no watch file)"
    if not watches:
        return Check(
            "watch file",
            "FAIL",
            f"{where}: no repository is watched",
            f"list repositories in {path} (GITOPS_ML_WATCH_CONFIG) or set GITOPS_ML_REPO_URL",
        ), []
    return Check("watch file", "OK", f"{where}: {', '.join(w.name for w in watches)}"), watches


def check_airflow_api(url: str | None) -> Check:
    if not url:
        return _skip("airflow api", "set AIRFLOW_API_URL")

    def probe() -> str:
        from gitops_ml.airflow.client import AirflowClient  # noqa: PLC0415

        health = _http_json(url.rstrip("/") + "/api/v2/monitor/health")
        bad = [
            f"{part} {state.get('status')}"
            for part, state in health.items()
            if isinstance(state, dict) and state.get("status") not in ("healthy", None)
        ]
        if bad:
            raise RuntimeError(f"{url}: {', '.join(bad)}")
        AirflowClient(url, timeout=TIMEOUT, retry_seconds=0).get_run("gitops-ml-doctor")  # a token and a read
        return f"{url}: {', '.join(f'{k} healthy' for k in health)}; token accepted"

    return _run("airflow api", "set AIRFLOW_API_URL (and AIRFLOW_API_USERNAME / AIRFLOW_API_PASSWORD)", probe)


def check_metadata_db(url: str | None) -> Check:
    if not url:
        return _skip("metadata db", "set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN where Airflow runs")

    def probe() -> str:
        import sqlalchemy  # noqa: PLC0415

        args = {"connect_timeout": int(TIMEOUT)} if url.startswith("postgres") else {}
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                revision = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
        finally:
            engine.dispose()
        return f"{redact_url(url)}: schema revision {revision}"

    return _run("metadata db", "set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (host, user, password, database)", probe)


def check_broker(url: str | None, executor: str) -> Check:
    if not url:
        if executor == "CeleryExecutor":
            return Check(
                "broker",
                "FAIL",
                "AIRFLOW__CORE__EXECUTOR is CeleryExecutor but no broker is set",
                "set AIRFLOW__CELERY__BROKER_URL",
            )
        return _skip("broker", f"executor {executor or 'default'}; set AIRFLOW__CELERY__BROKER_URL for Celery")

    def probe() -> str:
        from kombu import Connection  # noqa: PLC0415 - Celery's own transport layer

        with Connection(url, connect_timeout=TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
        return f"{redact_url(url)}: connected"

    return _run("broker", "set AIRFLOW__CELERY__BROKER_URL (host, port, password)", probe)


def _mlflow_auth() -> tuple[dict[str, str], tuple[str, str] | None]:
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}, None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return {}, (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    return {}, None


def check_mlflow(settings: Settings) -> list[Check]:
    uri = settings.tracking_uri
    if not uri.startswith(("http://", "https://")):

        def local() -> str:
            path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:") else Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(f"{path.parent} is not writable")
            return f"{uri} (local store, one machine only)"

        return [
            _run("mlflow", "set MLFLOW_TRACKING_URI", local),
            _run("artifact store", "set GITOPS_ML_ARTIFACT_ROOT", lambda: f"{settings.artifact_root} (local folder)"),
        ]
    headers, auth = _mlflow_auth()
    base = uri.rstrip("/")

    def tracking() -> str:
        found = _http_json(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", auth, headers)
        return f"{uri}: {len(found.get('experiments', []))} experiment(s) readable"

    def artifacts() -> str:
        # The proxied artifact store (``mlflow server --artifacts-destination``): the server lists it.
        listed = _http_json(f"{base}/api/2.0/mlflow-artifacts/artifacts", auth, headers)
        return f"{uri} (proxied): {len(listed.get('files', []))} top-level entr(ies) listed"

    return [
        _run("mlflow", "set MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN)", tracking),
        _run(
            "artifact store",
            "fix the MLflow server's --artifacts-destination bucket and its credentials "
            "(MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY on the server)",
            artifacts,
        ),
    ]


def check_elasticsearch() -> Check:
    url = Settings.from_env().es_url
    if not url:
        return _skip("elasticsearch", "set ES_URL to ship task logs and records")

    def probe() -> str:
        from gitops_ml import logs  # noqa: PLC0415

        client = logs.es_client(url)
        try:
            health = client.cluster.health()
        finally:
            client.close()
        if health["status"] == "red":
            raise RuntimeError(f"{redact_url(url)}: cluster health red")
        return f"{redact_url(url)}: cluster {health['status']}"

    return _run("elasticsearch", "set ES_URL (and ES_API_KEY or ES_USERNAME/ES_PASSWORD, ES_CA_CERTS)", probe)


def check_replicas(urls: list[str], model_name: str, variable: str) -> list[Check]:
    checks = []
    for url in urls:

        def probe(url: str = url) -> str:
            _http_json(f"{url}/health")
            response = httpx.get(f"{url}/version", timeout=TIMEOUT)
            if response.status_code == 503:
                return "up, serves nothing yet"
            response.raise_for_status()
            served = response.json()
            if served.get("model_name") != model_name:
                raise RuntimeError(f"{url} serves model {served.get('model_name')!r}, expected {model_name!r}")
            return f"model {model_name} version {served.get('model_version')} of commit {served.get('commit_sha')}"

        checks.append(_run(f"serving {url}", f"start the model server there or correct {variable}", probe))
    return checks


def check_repository(watch, settings: Settings) -> list[Check]:
    """Git remote with its credentials, then the DVC remote named in the branch head's ``.dvc/config``."""
    from gitops_ml import data, source  # noqa: PLC0415
    from gitops_ml.remote_head import head_of  # noqa: PLC0415

    fix_git = (
        f"check repo_url and branch of watch {watch.name!r} and the variables its ${{VAR}} credentials "
        "name (set where the triggerer and the workers run)"
    )
    git_check = _run(f"git {watch.name}", fix_git, lambda: _head(head_of, watch))
    if git_check.status != "OK":
        return [git_check, Check(f"dvc remote {watch.name}", "SKIP", "needs the Git remote", "fix the Git check first")]

    def dvc() -> str:
        with tempfile.TemporaryDirectory(prefix="gitops-ml-doctor-") as scratch:
            cache = Path(scratch)
            commit = source.resolve_commit(watch.url, watch.branch, None, cache / "git")
            workdir = source.checkout(watch.url, commit.commit_sha, cache / "git", cache / "work")
            return f"{data.check_remote(workdir, cache / 'dvc-cache')} (at commit {commit.commit_sha})"

    fix_dvc = (
        f"the default DVC remote in .dvc/config of watch {watch.name!r} (bucket, endpointurl) and the "
        "workers' credentials for it (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )
    return [git_check, _run(f"dvc remote {watch.name}", fix_dvc, dvc)]


def _head(head_of, watch) -> str:
    head = head_of(watch.url, watch.branch)
    if head is None:
        raise RuntimeError(f"{watch.safe_url} has no branch {watch.branch!r}")
    return f"{watch.safe_url} [{watch.branch}] at {head}"


def run(settings: Settings | None = None) -> list[Check]:
    settings = settings or Settings.from_env()
    watch_check, watches = check_watch_file()
    checks = [
        watch_check,
        check_airflow_api(settings.airflow_api_url or None),
        check_metadata_db(os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")),
        check_broker(os.environ.get("AIRFLOW__CELERY__BROKER_URL"), os.environ.get("AIRFLOW__CORE__EXECUTOR", "")),
        *check_mlflow(settings),
        check_elasticsearch(),
    ]
    replicas: dict[str, tuple[str, str]] = {}
    for watch in watches:
        if watch.serving_url:
            for url in Settings(home=settings.home, serving_url=watch.serving_url).serving_urls:
                replicas.setdefault(
                    url, (watch.model_name or settings.model_name, f"serving_url of watch {watch.name!r}")
                )
    if not replicas or any(not w.serving_url for w in watches):
        for url in settings.serving_urls:
            replicas.setdefault(url, (settings.model_name, "GITOPS_ML_SERVING_URL"))
    for url, (model_name, variable) in replicas.items():
        checks += check_replicas([url], model_name, variable)
    for watch in watches:
        checks += check_repository(watch, settings)
    return checks


def report(checks: list[Check]) -> tuple[str, int]:
    """The printed lines and the exit status (1 when a check failed)."""
    failed = [c for c in checks if c.status == "FAIL"]
    counts = {status: sum(c.status == status for c in checks) for status in ("OK", "SKIP", "FAIL")}
    summary = f"{counts['OK']} ok, {counts['SKIP']} skipped (not configured), {counts['FAIL']} failed" + (
        f": {', '.join(c.name for c in failed)}" if failed else ""
    )
    return "\n".join([*(c.line() for c in checks), summary]), 1 if failed else 0
