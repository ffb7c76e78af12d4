"""docker-compose.yml is for users (no Docker engine here): checked statically.

With Debian's docker-compose installed (CI installs it) the file is validated against the
Compose schema, with a filled-in .env and without one (compose must refuse to start); the
structural checks below always run.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers import ROOT

SECRETS = (
    "POSTGRES_PASSWORD",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_SECRET_KEY",
    "GITOPS_ML_SERVING_TOKEN",
    "REDIS_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


def _compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def test_compose_schema_when_docker_compose_is_installed():
    compose = yaml.safe_load(_compose_text())
    services = compose["services"]
    for name in (
        "postgres",
        "redis",
        "s3",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker-1",
        "airflow-worker-2",
        "mlflow",
        "serving-1",
        "serving-2",
        "elasticsearch",
        "kibana",
    ):
        assert name in services, name
    env = services["airflow-worker-1"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["GITOPS_ML_SERVING_URL"] == "http://serving-1:8765,http://serving-2:8765"
    # MLflow's artifacts go to the S3 store, not to a volume.
    command = services["mlflow"]["command"]
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000"

    # Workers share no volume with each other or with the control plane.
    def state_volumes(name):
        return {v.split(":")[0] for v in services[name]["volumes"] if not v.startswith(("$", "."))}

    workers = [state_volumes("airflow-worker-1"), state_volumes("airflow-worker-2"), state_volumes("airflow-scheduler")]
    assert all(workers) and not (workers[0] & workers[1]) and not ((workers[0] | workers[1]) & workers[2]), workers
    # Every dependency waits for a healthy (or finished) service, and every long-running service has a healthcheck.
    for name, service in services.items():
        for dependency, condition in (
            (service.get("depends_on") or {}).items() if isinstance(service.get("depends_on"), dict) else []
        ):
            assert condition["condition"] in ("service_healthy", "service_completed_successfully"), (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} would listen on every interface"


def test_no_usable_default_secret():
    """The finding: change-me-* defaults for the JWT secret and the serving token, 'airflow' for PostgreSQL."""
    text = _compose_text()
    assert "change-me" not in text.lower()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used"
        for rest in uses:
            assert rest == f":?set {name} in .env, see .env.example", f"${{{name}{rest}}} has a default or no error"
    # No literal secret either: every password/secret/token value comes from a required variable.
    env = yaml.safe_load(text)["x-gitops-ml-env"]
    for key, value in env.items():
        if re.search(r"SECRET|TOKEN|PASSWORD", key) and key != "GITOPS_ML_WEBHOOK_SECRET":
            assert str(value).startswith("${") and ":?" in str(value), key
    assert env["GITOPS_ML_WEBHOOK_SECRET"] == "${GITOPS_ML_WEBHOOK_SECRET:-}"  # empty: webhooks refused


def test_mlflow_allowed_hosts_are_narrowed():
    command = yaml.safe_load(_compose_text())["services"]["mlflow"]["command"]
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert "*" not in "".join(hosts)
    assert set(hosts) == {"mlflow", "mlflow:5000", "localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:5000"}


def test_env_example_explains_every_variable_compose_reads():
    example = (ROOT / ".env.example").read_text()
    lines = example.splitlines()
    defined = {line.split("=", 1)[0]: i for i, line in enumerate(lines) if re.match(r"^[A-Z][A-Z0-9_]*=", line)}
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)[:}]", re.sub(r"(?m)^\s*#.*$", "", _compose_text())))
    assert used <= set(defined), f"not in .env.example: {sorted(used - set(defined))}"
    for name, index in defined.items():
        assert lines[index - 1].startswith("#"), f"{name} has no explanation above it"
        if name in SECRETS:
            assert lines[index] == f"{name}=", f"{name} must be empty in the example (no usable default)"


def test_compose_validates_with_a_filled_env_and_refuses_without_one(tmp_path):
    tool = shutil.which("docker-compose")
    assert tool, (
        "docker-compose is needed to check the file against the Compose schema: "
        "apt-get install docker-compose (.ci/run installs it)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}

    def config_check(env_file: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
            capture_output=True,
            text=True,
            env=clean,
            check=False,
        )

    filled = tmp_path / "filled.env"
    filled.write_text("".join(f"{name}=test-{name.lower()}-0123456789\n" for name in SECRETS))
    result = config_check(filled)
    assert result.returncode == 0, result.stderr
    empty = tmp_path / "empty.env"
    empty.write_text((ROOT / ".env.example").read_text())  # the example as is: secrets left empty
    result = config_check(empty)
    assert result.returncode != 0
    assert "see .env.example" in result.stderr and any(name in result.stderr for name in SECRETS), result.stderr
