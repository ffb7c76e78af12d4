"""The gitops-ml plugin app inside Airflow's real API app (``airflow.api_fastapi.app.create_app``,
plugins loaded from ``plugins/``), with the simple auth manager and authentication on
(``simple_auth_manager_all_admins=False``), against a real MLflow store.

The links need an Airflow user (JWT from the auth manager); the webhook needs none (its own HMAC).
"""

import mlflow
import pytest
from starlette.testclient import TestClient

from gitops_ml import registry

pytestmark = pytest.mark.integration

LINK = "/gitops-ml/runs/gitops_ml_pipeline/{run_id}/mlflow"


@pytest.fixture
def airflow_api(airflow_db, settings, monkeypatch):
    """Airflow's API app as the api-server builds it; ``token(role)`` signs a JWT for a simple-auth user."""
    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "alice:viewer,nobody:none")
    monkeypatch.setenv(
        "AIRFLOW__API_AUTH__JWT_SECRET", "test-jwt-secret-for-the-links-test-0123456789abcdef0123456789abcdef"
    )
    monkeypatch.setenv("GITOPS_ML_MLFLOW_UI_URL", "http://127.0.0.1:5999")
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app = create_app(apps="core")

    def token(username="alice", role="viewer"):
        return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))

    with TestClient(app) as client:
        yield client, token


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_dag_run_link_redirects_to_its_mlflow_run(airflow_api, settings):
    client, token = airflow_api
    exp = registry.experiment_id(settings)
    with mlflow.start_run(experiment_id=exp, tags={"gitops_ml.airflow_run_id": "commit__abc"}) as run:
        pass
    found = client.get(LINK.format(run_id="commit__abc"), headers=_bearer(token()), follow_redirects=False)
    assert found.status_code == 307, found.text
    assert found.headers["location"] == f"http://127.0.0.1:5999/#/experiments/{exp}/runs/{run.info.run_id}"
    # The UI's session cookie works as well as a bearer token.
    client.cookies.set("_token", token())
    assert client.get(LINK.format(run_id="commit__abc"), follow_redirects=False).status_code == 307
    client.cookies.clear()
    missing = client.get(LINK.format(run_id="commit__nothing"), headers=_bearer(token()), follow_redirects=False)
    assert missing.status_code == 404 and "commit__nothing" in missing.text
    served = client.get("/gitops-ml/serving", headers=_bearer(token()), follow_redirects=False)
    assert served.headers["location"] == settings.serving_url + "/version"


def test_anonymous_and_unauthorized_requests_are_refused(airflow_api, settings):
    client, token = airflow_api
    for path in (LINK.format(run_id="commit__abc"), "/gitops-ml/serving"):
        anonymous = client.get(path, follow_redirects=False)
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text)
        forged = client.get(path, headers=_bearer("not-a-jwt"), follow_redirects=False)
        assert forged.status_code == 403, (path, forged.status_code)
    no_role = client.get(
        LINK.format(run_id="commit__abc"), headers=_bearer(token("nobody", None)), follow_redirects=False
    )
    assert no_role.status_code == 403  # authenticated, but may not read the DAG's runs


def test_run_id_is_never_an_mlflow_filter(airflow_api, settings):
    """The finding: a run id such as ``x' OR params.secret = 'y`` made a yes/no oracle over any tag/param."""
    client, token = airflow_api
    exp = registry.experiment_id(settings)
    with mlflow.start_run(experiment_id=exp, tags={"gitops_ml.airflow_run_id": "commit__abc"}):
        mlflow.log_param("secret_param", "hunter2")
    for run_id in (
        "x' OR params.secret_param = 'hunter2",
        "commit__abc' OR '1' = '1",
        "a`b",
        "<script>",
        "commit__abc%",
        "x" * 251,
    ):
        answer = client.get(LINK.format(run_id=run_id), headers=_bearer(token()), follow_redirects=False)
        assert answer.status_code == 400, (run_id, answer.status_code, answer.text)
        assert "invalid Airflow run id" in answer.json()["error"]
        assert answer.headers["content-type"] == "application/json"  # never rendered as HTML
    # LIKE wildcards are not wildcards: only an exact run id finds the run.
    for near in ("commit__ab", "commit__abcd", "COMMIT__ABC"):
        answer = client.get(LINK.format(run_id=near), headers=_bearer(token()), follow_redirects=False)
        assert answer.status_code == 404, near


def test_webhook_needs_no_airflow_login_but_its_signature(airflow_api, settings, monkeypatch, tmp_path):
    client, _ = airflow_api
    config = tmp_path / "watch.yaml"
    config.write_text(f"repositories:\n  - name: demo\n    repo_url: {settings.repo_url}\n")
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    monkeypatch.setenv("GITOPS_ML_WEBHOOK_SECRET", "hook-secret")
    answer = client.post(
        "/gitops-ml/webhooks/demo",
        content=b"{}",
        headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + "0" * 64},
    )
    assert answer.status_code == 401 and "X-Hub-Signature-256" in answer.json()["error"]  # ours, not Airflow's
    assert client.post("/gitops-ml/webhooks/nope", content=b"{}").status_code == 404
