"""docker-compose.yml is for users (no Docker engine here): checked statically.

With Debian's docker-compose installed (CI installs it) the file is validated
against the Compose schema; the structural checks below always run.
"""

import shutil
import subprocess

import yaml

from tests.conftest import ROOT


def test_compose_schema_when_docker_compose_is_installed():
    tool = shutil.which("docker-compose")
    if tool:
        result = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "airflow-worker", "mlflow", "serving", "elasticsearch", "kibana"):
        assert name in services, name
    env = services["airflow-worker"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} would listen on every interface"
