"""The cluster of ``make test-cluster``, on loopback, started and stopped by the tests.

PostgreSQL 15 (Airflow metadata database, MLflow backend store), Redis 7 (Celery broker),
a moto S3 server (DVC remote of the model repositories, MLflow's artifact destination), an
MLflow tracking server (PostgreSQL backend, proxied artifacts), Elasticsearch, a smart-HTTP
Git server with credentials (the model repositories' remote), the Airflow api-server,
scheduler, dag-processor and triggerer, two Celery workers and the model servers.

Workers share no disk: every component has its own folder under one base folder, and each
Celery worker runs in its own mount namespace in which every other component's folder is
covered by an empty tmpfs.  A task can only reach what another task left through Git, S3,
MLflow, PostgreSQL, Redis or the Airflow API.  The code and the DAG files come from the
checkout, as an image would ship them.

Every process is started in its own session; :meth:`Cluster.stop` ends each of them (also
after a failed test: the pytest fixture calls it in ``finally``).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from gitops_ml.polling import poll
from gitops_ml.runs import run_id_for
from tests.helpers import free_port, git

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "gitops-pg"
WORKERS = ("worker-a", "worker-b")
# The two model repositories (images per class: different data, so different SHAs and models), each
# watched at a 1 s poll interval, and the model servers of each (two replicas serve the first).
MODEL_REPOSITORIES = {"digits": 20, "digits-b": 24}
SERVED_MODELS = {"serve-1": "digits", "serve-2": "digits", "serve-b": "digits-b"}
SERVERS = tuple(SERVED_MODELS)
# Every component's folder exists before the first isolated process starts (each hides the others).
COMPONENTS = ("control", *WORKERS, *SERVERS, "postgres", "redis", "s3", "mlflow", "git-remotes", "developer")
# Tiny training: a cluster run is about orchestration, not accuracy.
TINY_PARAMS = {
    "data": {"path": "data/images"},
    "image": {"height": 8, "width": 8, "channels": 1},
    "train": {"epochs": 2, "batch_size": 32, "learning_rate": 0.003, "seed": 42, "test_fraction": 0.2},
    "gate": {"min_accuracy": 0.0, "max_accuracy_drop": 1.0, "min_class_recall": None},
}


def missing_tools() -> list[str]:
    """What the cluster needs from the machine (``.ci/run`` installs the Debian packages)."""
    missing = [f"{PG_BIN}/postgres (apt-get install postgresql)"] if not (PG_BIN / "postgres").exists() else []
    if not shutil.which("redis-server"):
        missing.append("redis-server (apt-get install redis-server)")
    if not (BIN / "moto_server").exists():
        missing.append("moto_server (uv sync: dev group)")
    if not shutil.which("unshare"):
        missing.append("unshare (util-linux)")
    return missing


def wait_until(check, timeout: float, what: str, log: Path | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s ({last})\n{tail}")


def watched_run(airflow, watch: str, commit_sha: str, timeout: float) -> dict:
    """The pipeline run the watcher ``watch`` starts for ``commit_sha`` (an ``AirflowClient``'s view), once
    it ended in any state; ``TimeoutError`` when it was not started, or had not ended, within ``timeout`` s."""
    run_id = run_id_for(commit_sha, watch=watch)
    deadline = time.monotonic() + timeout
    _, started = poll(lambda: airflow.get_run(run_id), lambda run: run is not None, timeout, every=1)
    if not started:
        raise TimeoutError(f"no run {run_id} after {timeout:.0f} s: the watcher did not start it")
    return airflow.wait_for_run(run_id, timeout=max(1.0, deadline - time.monotonic()))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None
    isolate: bool


@dataclass
class Cluster:
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gitops-cluster-")))
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    secret: dict[str, str] = field(default_factory=dict)
    es_node: object = None
    git_server: object = None
    repos: dict[str, dict] = field(default_factory=dict)  # name -> create_model_repository's answer
    watches: list[dict] = field(default_factory=list)  # the watch file's entries (all components)

    def __post_init__(self) -> None:
        self.base.chmod(0o755)
        self.logs = self.base / "logs"
        self.logs.mkdir()
        for component in COMPONENTS:
            self.folder(component)
        for name in ("airflow", "mlflow", "pg", "s3", "redis", "git"):
            self.secret[name] = secrets.token_hex(12)
        self.secret["jwt"] = secrets.token_hex(32)
        self.secret["fernet"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()  # a Fernet key

    # --- paths and URLs -------------------------------------------------------------------
    def folder(self, component: str) -> Path:
        path = self.base / component
        path.mkdir(parents=True, exist_ok=True)
        return path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def airflow_db_url(self) -> str:
        return f"postgresql+psycopg2://airflow:{self.secret['airflow']}@127.0.0.1:{self.ports['pg']}/airflow"

    @property
    def mlflow_db_url(self) -> str:
        return f"postgresql+psycopg2://mlflow:{self.secret['mlflow']}@127.0.0.1:{self.ports['pg']}/mlflow"

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.secret['redis']}@127.0.0.1:{self.ports['redis']}/0"

    @property
    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "gitops-ml-test",
            "AWS_SECRET_ACCESS_KEY": self.secret["s3"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def git_url(self, repo: str, token: str = "${GIT_TOKEN}") -> str:
        return f"http://gitops:{token}@127.0.0.1:{self.git_server.port}/{repo}.git"

    # --- processes ------------------------------------------------------------------------
    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, isolate: bool = False
    ) -> Proc:
        """Start ``argv`` in its own session; ``isolate``: in a mount namespace that sees only its own folder."""
        log = self.logs / f"{name}.log"
        original = list(argv)
        full_env = {
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "LANG": "C.UTF-8",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_PYTHON_REFRESH": "quiet",
            "HOME": str(cwd or self.base),
            **env,
        }
        if isolate:
            hidden = [str(p) for p in sorted(self.base.iterdir()) if p.is_dir() and p not in (cwd, self.logs)]
            hide = " && ".join(f"mount -t tmpfs -o size=1m,mode=000 none {p}" for p in hidden) or "true"
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{hide} && exec "$@"',
                "isolated",
                *argv,
            ]
        popen = subprocess.Popen(
            argv,
            env=full_env,
            cwd=str(cwd or self.base),
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = Proc(name, popen, log, original, env, cwd, isolate)
        return self.procs[name]

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.popen.poll() is not None:
            return
        try:
            os.killpg(proc.popen.pid, sig)
            proc.popen.wait(timeout)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        self.kill(name)
        return self.spawn(name, proc.argv, proc.env, proc.cwd, proc.isolate)

    def stop(self, keep_logs: bool = False) -> Path | None:
        """End every process, remove the state; ``keep_logs``: keep the components' logs (returned)."""
        for name in reversed(list(self.procs)):
            self.kill(name, signal.SIGINT if name == "postgres" else signal.SIGTERM)  # postgres: fast shutdown
        if self.git_server is not None:
            self.git_server.stop()
        if self.es_node is not None:
            self.es_node.remove()
        kept = None
        if keep_logs:
            kept = self.base.with_name(self.base.name + "-logs")
            shutil.copytree(self.logs, kept, dirs_exist_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)
        return kept

    def start(self, report: Callable[[str], None] = print) -> None:
        """The whole cluster: the stores, the model repositories (``repos``), the model servers and
        Airflow watching every repository (``watches``); ``report`` gets a line at each stage."""
        started = time.monotonic()
        self.start_postgres()
        self.start_redis()
        self.start_s3()
        with ThreadPoolExecutor(3) as pool:  # the slow starters side by side
            elasticsearch = pool.submit(self.start_elasticsearch)
            self.start_mlflow()
            self.start_git()
            made = pool.map(self.create_model_repository, MODEL_REPOSITORIES, MODEL_REPOSITORIES.values())
            self.repos = {repo["name"]: repo for repo in made}
            elasticsearch.result()
        report(f"stores up in {time.monotonic() - started:.1f} s")
        for name, model_name in SERVED_MODELS.items():  # they start while Airflow does
            self.start_server(name, model_name, wait=False)
        self.watches = [self.watch_entry(name) for name in MODEL_REPOSITORIES]
        self.start_airflow(self.watches)
        for name in SERVED_MODELS:
            self.wait_server(name)
        report(f"cluster up in {time.monotonic() - started:.1f} s: {self.describe()}")

    # --- services -------------------------------------------------------------------------
    def start_postgres(self) -> None:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True
            )
        data = self.folder("postgres")
        pwfile = data / "pw"
        pwfile.write_text(self.secret["pg"])
        shutil.chown(data, PG_USER)
        pwfile.chmod(0o600)
        shutil.chown(pwfile, PG_USER)
        subprocess.run(
            [
                "runuser",
                "-u",
                PG_USER,
                "--",
                str(PG_BIN / "initdb"),
                "-D",
                str(data / "db"),
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        self.ports["pg"] = free_port()
        self.spawn(
            "postgres",
            [
                "runuser",
                "-u",
                PG_USER,
                "--",
                str(PG_BIN / "postgres"),
                "-D",
                str(data / "db"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports["pg"]),
                "-k",
                str(data),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            {},
        )
        import psycopg2

        def connect():
            return psycopg2.connect(
                host="127.0.0.1", port=self.ports["pg"], user="postgres", password=self.secret["pg"], dbname="postgres"
            )

        conn = wait_until(connect, 60, "PostgreSQL", self.procs["postgres"].log)
        conn.autocommit = True
        with conn.cursor() as cur:
            for role in ("airflow", "mlflow"):
                cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (self.secret[role],))
                cur.execute(f"CREATE DATABASE {role} OWNER {role}")
        conn.close()

    def start_redis(self) -> None:
        self.ports["redis"] = free_port()
        folder = self.folder("redis")
        self.spawn(
            "redis",
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.ports["redis"]),
                "--requirepass",
                self.secret["redis"],
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            {},
        )
        import redis

        wait_until(
            lambda: redis.Redis(port=self.ports["redis"], password=self.secret["redis"]).ping(),
            30,
            "Redis",
            self.procs["redis"].log,
        )

    def start_s3(self) -> None:
        self.ports["s3"] = free_port()
        self.spawn(
            "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["s3"])], {}, self.folder("s3")
        )
        wait_until(lambda: httpx.get(self.url("s3"), timeout=2).status_code < 500, 60, "moto S3", self.procs["s3"].log)
        for bucket in ("dvc", "mlflow"):
            self.s3_client().create_bucket(Bucket=bucket)

    def s3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url("s3"),
            aws_access_key_id=self.s3_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.s3_env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def mlflow_argv(self) -> list[str]:
        return [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports["mlflow"]),
            "--backend-store-uri",
            self.mlflow_db_url,
            "--artifacts-destination",
            "s3://mlflow/artifacts",
            "--workers",
            "1",
        ]

    def start_mlflow(self) -> None:
        self.ports.setdefault("mlflow", free_port())
        self.spawn(
            "mlflow",
            self.mlflow_argv(),
            {**self.s3_env, "MLFLOW_S3_ENDPOINT_URL": self.url("s3")},
            self.folder("mlflow"),
        )
        self.wait_mlflow()

    def wait_mlflow(self) -> None:
        wait_until(
            lambda: httpx.get(self.url("mlflow") + "/health", timeout=2).status_code == 200,
            300,
            "MLflow server",
            self.procs["mlflow"].log,
        )

    def start_elasticsearch(self) -> None:
        from tests.es_node import ElasticsearchNode

        self.es_node = ElasticsearchNode().start(timeout=300)
        self.ports["es"] = self.es_node.port

    def start_git(self) -> None:
        from tests.git_http import GitHttpServer

        self.git_server = GitHttpServer(self.folder("git-remotes"), username="gitops", password=self.secret["git"])

    # --- model repositories ---------------------------------------------------------------
    def create_model_repository(self, name: str, images_per_class: int = 20) -> dict:
        """A model repository with its DVC remote in S3 (``s3://dvc/<name>``), pushed to the Git server."""
        from gitops_ml import demo, source

        work = self.folder("developer") / name
        source.init_repository(work, "main")
        (work / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
        count = demo.write_digits(work / "data" / "images", images_per_class)
        env = {**os.environ, **self.s3_env}
        dvc = str(BIN / "dvc")
        for argv in (
            ["init", "-q"],
            ["remote", "add", "-d", "s3r", f"s3://dvc/{name}"],
            ["remote", "modify", "s3r", "endpointurl", self.url("s3")],
            ["config", "core.analytics", "false"],
            ["add", "-q", "data/images"],
            ["push", "-q"],
        ):
            subprocess.run([dvc, *argv], cwd=work, env=env, check=True, capture_output=True)
        commit_sha = demo.commit_all(work, f"{count} digit images tracked with DVC in S3")
        bare = self.folder("git-remotes") / f"{name}.git"
        subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
        git(work, "remote", "add", "origin", self.git_url(name, self.secret["git"]))
        git(work, "push", "-q", "origin", "main")
        return {"name": name, "path": work, "commit_sha": commit_sha, "images": count}

    def commit_param(self, repo: dict, key: str, value, push: bool = True) -> str:
        from gitops_ml import demo

        sha = demo.bump_param(repo["path"], key, value)
        if push:
            git(repo["path"], "push", "-q", "origin", "main")
        return sha

    # --- gitops-ml configuration ----------------------------------------------------------
    def watch_entry(self, repo: str) -> dict:
        """The watch of model repository ``repo``: 1 s poll, no retraining schedule, deployed to its servers."""
        servers = [self.url(server) for server, model_name in SERVED_MODELS.items() if model_name == repo]
        return {
            "name": repo,
            "repo_url": self.git_url(repo),
            "branch": "main",
            "poll_interval": 1,
            "retrain_schedule": None,
            "model_name": repo,
            "serving_url": ",".join(servers),
        }

    def write_watch_file(self, folder: Path, watches: list[dict]) -> Path:
        path = folder / "watch.yaml"
        path.write_text(yaml.safe_dump({"repositories": watches}, sort_keys=False))
        return path

    def gitops_env(self, folder: Path, watches: list[dict]) -> dict[str, str]:
        """What every gitops-ml process of one component gets: its own home and watch file."""
        return {
            "GITOPS_ML_HOME": str(folder / "home"),
            "GITOPS_ML_WATCH_CONFIG": str(self.write_watch_file(folder, watches)),
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "GITOPS_ML_MLFLOW_UI_URL": self.url("mlflow"),
            "GITOPS_ML_DEPLOY_TIMEOUT": "60",
            "GITOPS_ML_SHIP_WAIT_SECONDS": "20",
            "ES_URL": self.url("es"),
            "GIT_TOKEN": self.secret["git"],
            "AIRFLOW_API_URL": self.url("api"),
            **self.s3_env,
        }

    def airflow_env(self, folder: Path, watches: list[dict]) -> dict[str, str]:
        from gitops_ml.config import Settings
        from gitops_ml.stack import remote_logging_env

        return {
            "AIRFLOW_HOME": str(folder / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__FERNET_KEY": self.secret["fernet"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.url("api") + "/execution/",
            "AIRFLOW__API__BASE_URL": self.url("api"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secret["jwt"],
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.airflow_db_url,
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.airflow_db_url,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            # A worker that died (kill -9) is noticed after 60 s, not 5 minutes (less: false alarms under load).
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
            **self.gitops_env(folder, watches),
            **remote_logging_env(Settings(home=folder / "home", es_url=self.url("es"))),
        }

    def start_airflow(self, watches: list[dict]) -> None:
        control = self.folder("control")
        self.ports["api"] = free_port()
        env = self.airflow_env(control, watches)
        migrated = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            cwd=control,
            check=False,
        )
        if migrated.returncode:
            raise RuntimeError(f"airflow db migrate failed: {migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        self.spawn(
            "api-server",
            [
                str(BIN / "airflow"),
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports["api"]),
                "--workers",
                "1",
            ],
            env,
            control,
        )
        for component in ("scheduler", "dag-processor", "triggerer"):
            argv = [str(BIN / "airflow"), component] + (["--skip-serve-logs"] if component == "triggerer" else [])
            self.spawn(component, argv, env, control)
        for worker in WORKERS:
            self.start_worker(worker, watches)
        wait_until(
            lambda: (
                httpx.get(self.url("api") + "/api/v2/monitor/health", timeout=3).json()["scheduler"]["status"]
                == "healthy"
            ),
            600,
            "Airflow",
            self.procs["api-server"].log,
        )

    def start_worker(self, worker: str, watches: list[dict]) -> Proc:
        folder = self.folder(worker)
        env = {
            **self.airflow_env(folder, watches),
            "GITOPS_ML_TEST_HOSTNAME": worker,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.cluster.hostname.worker_hostname",
        }
        # No metadata-database access from the workers (Airflow 3: tasks go through the API).
        env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
        return self.spawn(
            worker,
            [
                str(BIN / "airflow"),
                "celery",
                "worker",
                "--concurrency",
                "1",
                "--celery-hostname",
                f"{worker}@cluster",
                "--skip-serve-logs",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
            folder,
            isolate=True,
        )

    def start_server(self, name: str, model_name: str, wait: bool = True) -> str:
        folder = self.folder(name)
        self.ports.setdefault(name, free_port())  # the same port after a restart (watch files name it)
        env = {
            "GITOPS_ML_HOME": str(folder / "home"),
            "GITOPS_ML_MODEL_NAME": model_name,
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
        }
        self.spawn(
            name,
            [str(BIN / "gitops-ml"), "serve", "--host", "127.0.0.1", "--port", str(self.ports[name])],
            env,
            folder,
            isolate=True,
        )
        if wait:
            self.wait_server(name)
        return self.url(name)

    def wait_server(self, name: str) -> None:
        wait_until(
            lambda: httpx.get(self.url(name) + "/health", timeout=2).status_code == 200,
            300,
            f"model server {name}",
            self.procs[name].log,
        )

    def serving(self, name: str) -> dict | None:
        response = httpx.get(self.url(name) + "/version", timeout=10)
        return None if response.status_code == 503 else response.json()

    def describe(self) -> str:
        return json.dumps({"base": str(self.base), "ports": self.ports}, indent=2)
