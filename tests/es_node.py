"""A real single-node Elasticsearch for the tests, from Maven Central (no Docker engine here).

``org.elasticsearch.distribution.integ-test-zip:elasticsearch:8.19.21`` is fetched with
the ordinary Maven client into ``~/.m2``, unpacked into a cache outside the repository,
and run on 127.0.0.1 with a 512 MB heap on the machine's Java 17.  Elasticsearch refuses
to run as root, so as root it runs as a system user created here (``runuser``).

    python -m tests.es_node start      # prints the URL; `stop` stops it
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from tests.helpers import free_port

VERSION = "8.19.21"
ARTIFACT = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{VERSION}:zip"
# As root, Elasticsearch runs as another user, who must be able to read the cache: keep it out of /root.
_DEFAULT_CACHE = (
    Path("/var/cache/gitops-ml/elasticsearch")
    if os.geteuid() == 0
    else Path.home() / ".cache" / "gitops-ml" / "elasticsearch"
)
CACHE = Path(os.environ.get("GITOPS_ML_ES_CACHE") or _DEFAULT_CACHE)
USER = "gitops-es"


def java_home() -> str:
    for candidate in (os.environ.get("ES_JAVA_HOME"), "/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/openjdk-17"):
        if candidate and Path(candidate, "bin", "java").exists():
            return candidate
    raise RuntimeError("no Java 17 found for Elasticsearch: set ES_JAVA_HOME")


def distribution() -> Path:
    """The unpacked distribution (fetched and unpacked once)."""
    home = CACHE / f"elasticsearch-{VERSION}"
    if (home / "bin" / "elasticsearch").exists():
        return home
    archive = (
        Path.home()
        / ".m2"
        / "repository"
        / "org"
        / "elasticsearch"
        / "distribution"
        / "integ-test-zip"
        / "elasticsearch"
        / VERSION
        / f"elasticsearch-{VERSION}.zip"
    )
    if not archive.exists():
        subprocess.run(
            ["mvn", "-q", "-B", "dependency:get", f"-Dartifact={ARTIFACT}", "-Dtransitive=false"], check=True
        )
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o755)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(CACHE)
    for path in (home / "bin").iterdir():
        path.chmod(0o755)
    for path in (home / "jdk" / "bin").glob("*") if (home / "jdk").exists() else []:
        path.chmod(0o755)
    return home


class ElasticsearchNode:
    """One node with its own data folder; ``stop()`` and ``start()`` keep data and port."""

    def __init__(self, workdir: Path | None = None, port: int | None = None):
        self.home = distribution()
        self.workdir = Path(workdir) if workdir else CACHE / "nodes" / f"node-{os.getpid()}-{time.time_ns()}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.as_root = os.geteuid() == 0
        self.config = self.workdir / "config"
        if not self.config.exists():
            shutil.copytree(self.home / "config", self.config)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.config / "elasticsearch.yml").write_text(
            f"cluster.name: gitops-ml-test\nnode.name: node-1\nnetwork.host: 127.0.0.1\nhttp.port: {self.port}\n"
            f"transport.port: {free_port()}\ndiscovery.type: single-node\nxpack.security.enabled: false\n"
            f"path.data: {self.workdir / 'data'}\npath.logs: {self.workdir / 'logs'}\n"
            "cluster.routing.allocation.disk.threshold_enabled: false\naction.destructive_requires_name: false\n"
        )
        (self.config / "jvm.options.d").mkdir(exist_ok=True)
        (self.config / "jvm.options.d" / "heap.options").write_text("-Xms512m\n-Xmx512m\n")
        if self.as_root:
            try:
                pwd.getpwnam(USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True
                )
            subprocess.run(["chown", "-R", f"{USER}:", str(self.workdir)], check=True)

    def start(self, timeout: float = 120) -> ElasticsearchNode:
        env = {
            **os.environ,
            "ES_JAVA_HOME": java_home(),
            "ES_PATH_CONF": str(self.config),
            "ES_JAVA_OPTS": "-Xms512m -Xmx512m",
        }
        argv = [str(self.home / "bin" / "elasticsearch")]
        if self.as_root:
            argv = [
                "runuser",
                "-u",
                USER,
                "--",
                "env",
                f"ES_JAVA_HOME={env['ES_JAVA_HOME']}",
                f"ES_PATH_CONF={self.config}",
                "ES_JAVA_OPTS=-Xms512m -Xmx512m",
                *argv,
            ]
        log = open(self.workdir / "stdout.log", "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Elasticsearch exited with {self.proc.returncode}: "
                    f"{(self.workdir / 'stdout.log').read_text()[-3000:]}"
                )
            try:
                health = httpx.get(f"{self.url}/_cluster/health", timeout=2)
                if health.status_code == 200 and health.json()["status"] in ("green", "yellow"):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Elasticsearch not healthy at {self.url} after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    state = CACHE / "node"
    if sys.argv[1:] == ["stop"]:
        pid_file = state / "pid"
        if pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            pid_file.unlink()
        print("stopped")
    else:
        node = ElasticsearchNode(state, port=int(os.environ.get("ES_PORT", "9200"))).start()
        (state / "pid").write_text(str(node.proc.pid))
        print(node.url)
