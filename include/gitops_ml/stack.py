"""The embedded stack: Airflow (``airflow standalone``: SQLite + LocalExecutor), the MLflow UI
and the model server, all on 127.0.0.1 with all state under ``GITOPS_ML_HOME``.

``gitops-ml stack up`` starts what is not running yet and waits until each answers;
``gitops-ml stack down`` stops them.  PIDs, logs and the URLs of the running stack
(``stack.json``, read by ``gitops-ml trigger``) live in ``<home>/stack``.

The repository is found without anything exported (:func:`locate_repository`): the configured
one (``GITOPS_ML_REPO_URL``, or the watch configuration), else the demo repository that
``gitops-ml init-demo``/``gitops-ml demo`` created under ``<home>/demo-repo``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from tenacity import Retrying, retry_if_exception_type, retry_if_result, stop_after_delay, wait_fixed

from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError
from gitops_ml.refs import redact_url

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_REPO_DIR = "demo-repo"
DEFAULT_PORTS = {"airflow_port": 8080, "mlflow_port": 5000, "serve_port": 8765}


def demo_repo_path(settings: Settings) -> Path:
    """Where ``gitops-ml demo`` keeps the demo model repository: ``<home>/demo-repo``."""
    return settings.home / DEMO_REPO_DIR


def locate_repository(settings: Settings) -> tuple[Settings, str]:
    """The repository to work on, and where it came from (for the user to read).

    ``settings.repo_url`` when set (``GITOPS_ML_REPO_URL`` or ``--repo-url``); else, when a watch
    configuration file exists, nothing more is needed (its watches name their repositories);
    else the demo repository under ``<home>/demo-repo`` if it exists.  Otherwise ``repo_url``
    stays empty and the description says how to configure one.
    """
    from gitops_ml import watch  # noqa: PLC0415

    if settings.repo_url:
        return settings, f"{redact_url(settings.repo_url)} [{settings.branch}] (GITOPS_ML_REPO_URL)"
    if watch.config_path().is_file():
        names = ", ".join(w.name for w in watch.load_watches())
        return settings, f"the watched repositories of {watch.config_path()} ({names or 'none'})"
    demo = demo_repo_path(settings)
    if (demo / ".git").is_dir():
        return settings.with_overrides(repo_url=str(demo)), f"{demo} [{settings.branch}] (the demo repository)"
    return settings, (
        "none: set GITOPS_ML_REPO_URL (a URL or a local path), write "
        f"{watch.config_path()}, or create the demo with `gitops-ml init-demo {demo}`"
    )


def trigger_target(settings: Settings, watch_name: str | None = None) -> tuple[Settings, dict[str, str]]:
    """Settings to resolve the commit with, and the run conf that names the repository for the workers.

    The conf carries the watch name when there is one (``--watch``, or the configured watch whose
    URL and branch are these): the workers look the URL, with any credentials, up themselves and
    the run id is the one the watcher gives.  Otherwise it carries ``repo_url`` and ``branch``, and a
    URL with credentials is refused: a run conf is stored in the Airflow database and shown in the UI.
    """
    from gitops_ml import watch  # noqa: PLC0415
    from gitops_ml.runs import DEFAULT_WATCH  # noqa: PLC0415

    if watch_name:
        watched = watch.get_watch(watch_name)
        return (
            settings.with_overrides(repo_url=watched.url, branch=watched.branch, model_name=watched.model_name),
            {"watch": watched.name},
        )
    configured = watch.load_watches() if watch.config_path().is_file() else []
    if not settings.repo_url and configured:
        chosen = [w for w in configured if w.name == DEFAULT_WATCH] or (configured if len(configured) == 1 else [])
        if not chosen:
            raise GitopsMLError(
                f"several watched repositories in {watch.config_path()} "
                f"({', '.join(w.name for w in configured)}): choose one with --watch NAME"
            )
        return trigger_target(settings, chosen[0].name)
    settings, where = locate_repository(settings)
    if not settings.repo_url:
        raise GitopsMLError(f"no repository to trigger: {where}")
    same = [w for w in configured if w.safe_url == redact_url(settings.repo_url) and w.branch == settings.branch]
    if same:
        return trigger_target(settings, same[0].name)
    if redact_url(settings.repo_url) != settings.repo_url:
        raise GitopsMLError(
            f"the repository URL {redact_url(settings.repo_url)} carries credentials, and a run conf is stored in "
            "the Airflow database and shown in the UI: configure the repository as a watched repository "
            f"({watch.config_path()}, credentials as ${{VAR}}) and trigger it with --watch NAME"
        )
    return settings, {"repo_url": settings.repo_url, "branch": settings.branch}


def contained_env(settings: Settings) -> dict[str, str]:
    """Where the libraries gitops-ml runs keep their own files: under ``GITOPS_ML_HOME``, never in the
    user's home (Airflow's ``~/airflow``, Keras' ``~/.keras``, Matplotlib's ``~/.cache`` and
    ``~/.config``).  MLflow's only place for its telemetry id is the user's ``~/.config``, so its
    telemetry is off.  Set for the CLI and every process it starts, unless the user set them."""
    return {
        "AIRFLOW_HOME": str(settings.airflow_home),
        "KERAS_HOME": str(settings.home / "keras"),
        "MPLCONFIGDIR": str(settings.home / "matplotlib"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def airflow_env(settings: Settings, api_port: int = 8080, project_root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Environment for every Airflow process of the embedded stack (and for ``dag.test()``)."""
    airflow_home = settings.airflow_home
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project_root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(project_root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "GITOPS_ML_HOME": str(settings.home),
        "GITOPS_ML_REPO_URL": settings.repo_url,
        "GITOPS_ML_BRANCH": settings.branch,
        "GITOPS_ML_MODEL_NAME": settings.model_name,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "GITOPS_ML_ARTIFACT_ROOT": settings.artifact_root,
        "GITOPS_ML_SERVING_URL": settings.serving_url,
        # `airflow standalone` starts its components as `airflow ...` from PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **remote_logging_env(settings),
    }


def remote_logging_env(settings: Settings) -> dict[str, str]:
    """Airflow settings that make the UI read finished task logs from Elasticsearch (``ES_URL``).

    The provider's ``[elasticsearch]`` reader over our ECS documents (``gitops_ml.airflow.remote_log``);
    the credentials of :func:`gitops_ml.logs.es_credentials` go to ``[elasticsearch_configs]`` (the
    client's own options), never into the host URL.
    """
    if not settings.es_url:
        return {}
    from gitops_ml.logs import LOGS_INDEX, es_credentials  # noqa: PLC0415

    env = {
        "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
        "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": "gitops_ml.airflow.log_config.LOGGING_CONFIG",
        "AIRFLOW__ELASTICSEARCH__HOST": settings.es_url,
        "AIRFLOW__ELASTICSEARCH__INDEX_PATTERNS": f"{LOGS_INDEX}*",
        "AIRFLOW__ELASTICSEARCH__WRITE_TO_ES": "False",
        "AIRFLOW__ELASTICSEARCH__LOG_ID_TEMPLATE": "{dag_id}-{task_id}-{run_id}-{map_index}-{try_number}",
    }
    for option, value in es_credentials(settings).items():
        # basic_auth: a config value is a string, which the client takes as the encoded pair
        text = base64.b64encode(":".join(value).encode()).decode() if isinstance(value, tuple) else value
        env[f"AIRFLOW__ELASTICSEARCH_CONFIGS__{option.upper()}"] = text
    return env


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _stack_dir(settings: Settings) -> Path:
    path = settings.home / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def start(settings: Settings, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start ``argv`` in its own process group with output to ``<home>/stack/<name>.log``."""
    folder = _stack_dir(settings)
    pid_file = folder / f"{name}.pid"
    pid = _alive(pid_file)
    if pid:
        return pid
    with open(folder / f"{name}.log", "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    except ChildProcessError:
        pass
    return False


def stop(settings: Settings, name: str, timeout: float = 20.0) -> bool:
    """Stop the process group of ``name``: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    pid_file = _stack_dir(settings) / f"{name}.pid"
    pid = _alive(pid_file)
    pid_file.unlink(missing_ok=True)
    if not pid:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        if Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(0.2),
            retry=retry_if_result(lambda gone: not gone),
            retry_error_callback=lambda _: False,
        )(_gone, pid):
            return True
    return True


def wait_http(url: str, timeout: float, what: str, log_file: Path | None = None) -> None:
    """Wait until ``url`` answers below HTTP 500; a ``TimeoutError`` names the last problem."""

    def give_up(state) -> None:
        error = state.outcome.exception()
        last = str(error) if error else f"HTTP {state.outcome.result()}"
        hint = f"; see {log_file}" if log_file else ""
        raise TimeoutError(f"{what} did not answer at {url} within {timeout:.0f} s ({last}){hint}")

    Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.5),
        retry=retry_if_exception_type(httpx.HTTPError) | retry_if_result(lambda status: status >= 500),
        retry_error_callback=give_up,
    )(lambda: httpx.get(url, timeout=2).status_code)


def recorded_urls(settings: Settings) -> dict[str, str]:
    """URLs of the stack ``stack up`` started under this home (empty when none was recorded)."""
    try:
        return json.loads((settings.home / "stack" / "stack.json").read_text())["urls"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}


def stack_settings(
    settings: Settings, airflow_port: int = 8080, mlflow_port: int = 5000, serve_port: int = 8765
) -> Settings:
    """The settings every process of the embedded stack gets: the repository found by
    :func:`locate_repository`, and the server and MLflow UI on the chosen ports (the deploy step
    converges the stack's own server)."""
    settings, _ = locate_repository(settings)
    return settings.with_overrides(
        serving_url=f"http://127.0.0.1:{serve_port}", mlflow_ui_url=f"http://127.0.0.1:{mlflow_port}"
    )


def up(settings: Settings, airflow_port: int = 8080, mlflow_port: int = 5000, serve_port: int = 8765) -> dict[str, str]:
    """Start Airflow, the MLflow UI and the model server; return their URLs.

    Refuses to start on other ports than a stack of the same home that is still running
    (its processes would be reused and never answer on the new ports).
    """
    from gitops_ml import registry  # noqa: PLC0415

    folder = _stack_dir(settings)
    urls = {
        "airflow": f"http://127.0.0.1:{airflow_port}",
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "serving": f"http://127.0.0.1:{serve_port}",
    }
    running = [name for name in ("airflow", "mlflow", "serve") if _alive(folder / f"{name}.pid")]
    previous = recorded_urls(settings)
    if running and previous and previous != urls:
        raise GitopsMLError(
            f"the stack of {settings.home} is already running ({', '.join(running)}) at "
            f"{', '.join(f'{k} {v}' for k, v in previous.items())}: "
            "stop it first (`gitops-ml stack down`) to use other ports"
        )
    settings = stack_settings(settings, airflow_port, mlflow_port, serve_port)
    env = {
        **airflow_env(settings, airflow_port),
        "GITOPS_ML_MLFLOW_UI_URL": settings.mlflow_ui_url,
        "AIRFLOW_API_URL": urls["airflow"],
    }
    registry.experiment_id(settings)  # create/migrate the MLflow store once, before any concurrent writer
    (folder / "stack.json").write_text(json.dumps({"urls": urls}, indent=2))
    start(settings, "airflow", [_bin("airflow"), "standalone"], env)
    start(
        settings,
        "mlflow",
        [
            _bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            settings.tracking_uri,
            "--default-artifact-root",
            settings.artifact_root,
            "--workers",
            "1",
        ],
        env,
    )
    start(settings, "serve", [_bin("gitops-ml"), "serve", "--host", "127.0.0.1", "--port", str(serve_port)], env)
    wait_http(urls["serving"] + "/health", 120, "model server", folder / "serve.log")
    wait_http(urls["mlflow"] + "/health", 120, "MLflow UI", folder / "mlflow.log")
    wait_http(urls["airflow"] + "/api/v2/monitor/health", 180, "Airflow", folder / "airflow.log")
    return urls


def down(settings: Settings) -> list[str]:
    stopped = [name for name in ("serve", "mlflow", "airflow") if stop(settings, name)]
    (_stack_dir(settings) / "stack.json").unlink(missing_ok=True)
    return stopped
