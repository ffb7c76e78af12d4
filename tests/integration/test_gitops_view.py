"""The GitOps page's endpoints inside Airflow's real API app (plugins loaded from ``plugins/``, the
simple auth manager with authentication on) over a seeded history in the real stores: the Airflow
metadata DB, an MLflow registry, a Git mirror and the run records (``tests/history_seed.py``), for
two watched repositories (the watch file), each with its own registered model and model servers.
The browser side and a real rollback are in ``tests/e2e/test_gitops_page.py``."""

import json

import pytest
from starlette.testclient import TestClient

from tests.helpers import free_port
from tests.history_seed import seed

pytestmark = pytest.mark.integration

COMMITS = 30
VISION_COMMITS = 7


@pytest.fixture
def seeded_api(airflow_db, settings, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-jwt-secret-of-the-gitops-view-0123456789abcdef012345")
    monkeypatch.setenv("GITOPS_ML_REPO_URL", str(tmp_path / "long-history"))
    vision_serving = f"http://127.0.0.1:{free_port()}"
    watches = tmp_path / "watch.yaml"
    watches.write_text(
        json.dumps(
            {
                "repositories": [
                    {"name": "default", "repo_url": str(tmp_path / "long-history")},
                    {
                        "name": "vision",
                        "repo_url": str(tmp_path / "vision-history"),
                        "branch": "main",
                        "model_name": "vision-classifier",
                        "serving_url": vision_serving,
                    },
                ]
            }
        )
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(watches))
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    from gitops_ml.config import Settings
    from gitops_ml.runs import PIPELINE_DAG_ID
    from gitops_ml.watch import get_watch

    # The session's Airflow DB is shared: runs that earlier tests left (other repositories) would count
    # in the page's history, so the seeded history starts from none.
    with create_session() as session:
        session.execute(delete(DagRun).where(DagRun.dag_id == PIPELINE_DAG_ID))
    seeded = seed(Settings.from_env(), COMMITS)
    seeded["vision"] = seed(get_watch("vision").run_settings(), VISION_COMMITS, failed_every=3, watch="vision")
    seeded["vision"]["serving_url"] = vision_serving
    app = create_app(apps="core")

    def token(role):
        return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=f"a-{role}", role=role))

    try:
        with TestClient(app) as client:
            yield client, token, seeded
    finally:  # the session's Airflow DB is shared with other tests
        with create_session() as session:
            run_ids = seeded["run_ids"] + seeded["vision"]["run_ids"]
            session.execute(delete(DagRun).where(DagRun.run_id.in_(run_ids)))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_history_pages_newest_first_with_decisions_gates_and_versions(seeded_api):
    client, token, seeded = seeded_api
    shas = seeded["shas"]
    answer = client.get("/gitops-ml/api/history", params={"page": 1, "per_page": 10}, headers=bearer(token("viewer")))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [s["watch"] for s in body["sections"]] == ["default", "vision"]  # the watch file's order
    default = body["sections"][0]
    assert (default["total"], default["pages"], default["page"]) == (COMMITS, 3, 1)
    assert default["model_name"] == "gitops-ml-classifier"
    rows = default["rows"]
    assert [r["commit_sha"] for r in rows] == shas[::-1][:10]  # newest first
    assert body["user"] == {"name": "a-viewer", "may_deploy": False}
    assert default["now_serving"]["model_version"] == seeded["champion"] == "29"
    assert default["now_serving"]["commit_sha"] == shas[28]
    assert default["now_serving"]["message"] == "Tune the model, step 29"
    newest, champion = rows[0], rows[1]  # step 30 failed its gate; step 29 is the champion
    assert newest["decision"]["text"] == "trained" and newest["deploy"]["kind"] == "not_promoted"
    assert newest["gate"]["passed"] is False
    assert newest["gate"]["reasons"] == [
        "accuracy 0.5000 is below gate.min_accuracy 0.8",
        "recall below gate.min_class_recall 0.5 for class(es) 7 (0.3)",
        "accuracy 0.5000 is 0.4500 below the champion's 0.9500 (gate.max_accuracy_drop 0.02)",
    ]
    recall = {k: newest["gate"][k] for k in ("recall_floor", "worst_class", "worst_class_recall", "recall_passed")}
    assert recall == {"recall_floor": 0.5, "worst_class": "7", "worst_class_recall": 0.3, "recall_passed": False}
    assert (champion["gate"]["worst_class_recall"], champion["gate"]["recall_passed"]) == (0.91, True)
    assert newest["can_roll_back"] is False
    assert champion["deploy"]["serving"] is True and champion["can_roll_back"] is False
    assert champion["message"] == "Tune the model, step 29" and champion["author"] == "Ada Lovelace"
    assert champion["on_branch"] is True and champion["run"]["duration_s"] == 65.0
    assert [t["state"] for t in champion["run"]["tasks"]] == ["success"] * 8
    assert rows[2]["can_roll_back"] is True and rows[2]["model_version"] == "28"
    last = client.get(
        "/gitops-ml/api/history", params={"page": 3, "per_page": 10}, headers=bearer(token("viewer"))
    ).json()
    assert [r["commit_sha"] for r in last["sections"][0]["rows"]] == shas[::-1][20:]
    one = client.get(
        "/gitops-ml/api/history", params={"run_id": f"commit__{shas[4]}"}, headers=bearer(token("viewer"))
    ).json()
    assert [s["watch"] for s in one["sections"]] == ["default"]
    assert [r["commit_sha"] for r in one["sections"][0]["rows"]] == [shas[4]]
    assert (
        client.get("/gitops-ml/api/history", params={"per_page": 101}, headers=bearer(token("viewer"))).status_code
        == 422
    )
    for bad in ({"run_id": "x' OR 1=1"}, {"watch": "../x"}, {"watch_page": "vision:x"}):
        assert client.get("/gitops-ml/api/history", params=bad, headers=bearer(token("viewer"))).status_code == 422
    unknown = client.get("/gitops-ml/api/history", params={"watch": "nobody"}, headers=bearer(token("viewer")))
    assert unknown.status_code == 400 and "no watched repository named 'nobody'" in unknown.json()["error"]
    user = client.get("/gitops-ml/api/history", headers=bearer(token("user"))).json()["user"]
    assert user["may_deploy"] is True


def test_one_section_per_watched_repository_with_its_own_model_servers_and_pages(seeded_api):
    client, token, seeded = seeded_api
    vision = seeded["vision"]
    body = client.get("/gitops-ml/api/history", params={"per_page": 3}, headers=bearer(token("viewer"))).json()
    section = body["sections"][1]
    assert (section["watch"], section["model_name"], section["total"], section["pages"]) == (
        "vision",
        "vision-classifier",
        VISION_COMMITS,
        3,
    )
    assert section["repository"].endswith("vision-history")
    assert section["now_serving"]["model_version"] == vision["champion"] == "7"  # its own registered model
    assert section["now_serving"]["commit_sha"] == vision["shas"][6]
    assert [r["url"] for r in section["now_serving"]["replicas"]] == [vision["serving_url"]]
    assert [r["url"] for r in body["sections"][0]["now_serving"]["replicas"]] != [vision["serving_url"]]
    rows = section["rows"]
    assert [r["commit_sha"] for r in rows] == vision["shas"][::-1][:3]
    assert [r["run"]["run_id"] for r in rows] == [f"commit__{s}__vision" for s in vision["shas"][::-1][:3]]
    assert [r["deploy"]["kind"] for r in rows] == ["promoted", "not_promoted", "promoted"]  # 6 failed its gate
    assert rows[0]["links"]["mlflow_version"].endswith("/#/models/vision-classifier/versions/7")
    assert rows[2]["can_roll_back"] is True and rows[2]["model_version"] == "5"
    # Its own page, the other section stays on its first: one request.
    paged = client.get(
        "/gitops-ml/api/history", params={"per_page": 3, "watch_page": "vision:3"}, headers=bearer(token("viewer"))
    ).json()
    default, vision_page = paged["sections"]
    assert default["page"] == 1 and default["rows"][0]["commit_sha"] == seeded["shas"][-1]
    assert vision_page["page"] == 3 and [r["commit_sha"] for r in vision_page["rows"]] == [vision["shas"][0]]
    only = client.get("/gitops-ml/api/history", params={"watch": "vision"}, headers=bearer(token("viewer"))).json()
    assert [s["watch"] for s in only["sections"]] == ["vision"] and len(only["sections"][0]["rows"]) == VISION_COMMITS
    # A roll-back names its watch: version 7 is vision's champion, not the default model's (29).
    user = bearer(token("user"))
    answer = client.post("/gitops-ml/api/deploy", json={"watch": "vision", "model_version": "7"}, headers=user)
    assert answer.status_code == 400 and "already the champion" in answer.json()["error"], answer.text
    answer = client.post("/gitops-ml/api/deploy", json={"watch": "vision", "model_version": "29"}, headers=user)
    assert answer.status_code == 400 and "version 29 of vision-classifier does not exist" in answer.json()["error"]
    for watch, expected in (("nobody", "no watched repository named 'nobody'"), ("../x", "watch must be")):
        answer = client.post("/gitops-ml/api/deploy", json={"watch": watch, "model_version": "5"}, headers=user)
        assert answer.status_code == 400 and expected in answer.json()["error"], answer.text


def test_page_needs_a_login_and_read_access(seeded_api):
    client, token, _ = seeded_api
    for method, path in (
        ("GET", "/gitops-ml/ui"),
        ("GET", "/gitops-ml/api/history"),
        ("POST", "/gitops-ml/api/deploy"),
    ):
        assert client.request(method, path).status_code == 401, path
        assert client.request(method, path, headers=bearer("forged")).status_code == 403, path
        assert client.request(method, path, headers=bearer(token(None))).status_code == 403, path
    page = client.get("/gitops-ml/ui", headers=bearer(token("viewer")))
    assert page.status_code == 200 and "<h1>GitOps</h1>" in page.text
    client.cookies.set("_token", token("viewer"))  # the UI's session cookie, as the frame sends it
    assert client.get("/gitops-ml/api/history").status_code == 200
    client.cookies.clear()


def test_deploy_is_for_users_who_may_trigger_and_refuses_bad_versions(seeded_api, settings):
    client, token, _ = seeded_api
    viewer = client.post("/gitops-ml/api/deploy", json={"model_version": "28"}, headers=bearer(token("viewer")))
    assert viewer.status_code == 403
    user = bearer(token("user"))
    assert client.post("/gitops-ml/api/deploy", data={"model_version": "28"}, headers=user).status_code == 415
    assert (
        client.post(
            "/gitops-ml/api/deploy", content=b"{", headers={**user, "Content-Type": "application/json"}
        ).status_code
        == 400
    )
    for version, expected in (
        ("30", "failed its gate"),
        ("999", "does not exist"),
        ("29", "already the champion"),
        ("../1", "must be a version number"),
        (["1"], "must be a version number"),
    ):
        answer = client.post("/gitops-ml/api/deploy", json={"model_version": version}, headers=user)
        assert answer.status_code == 400 and expected in answer.json()["error"], (version, answer.text)
    from gitops_ml import registry
    from gitops_ml.config import Settings

    assert str(registry.get_alias(Settings.from_env()).version) == "29"  # nothing moved


def test_plugin_views_have_url_routes_and_task_links(seeded_api):
    client, token, _ = seeded_api
    plugins = client.get("/api/v2/plugins", headers=bearer(token("admin"))).json()["plugins"]
    views = [v for p in plugins if p["name"] == "gitops_ml" for v in p["external_views"]]
    assert all(v["url_route"] for v in views if v["destination"] != "nav" or v["name"] == "GitOps"), views
    assert {(v["destination"], v["url_route"]) for v in views if v["url_route"]} == {
        ("nav", "gitops"),
        ("dag", "gitops-dag"),
        ("dag_run", "gitops-run"),
    }
    from airflow.models.taskinstancekey import TaskInstanceKey

    from gitops_ml.airflow.extra_links import MLflowRunLink, ServingVersionLink

    class Task:
        def __init__(self, task_id):
            self.task_id = task_id

    key = TaskInstanceKey("gitops_ml_pipeline", "train", "commit__abc", 1)
    link = MLflowRunLink().get_link(Task("train"), ti_key=key)
    assert link == "/gitops-ml/runs/gitops_ml_pipeline/commit__abc/mlflow"
    assert MLflowRunLink().get_link(Task("deploy"), ti_key=key) == ""
    assert ServingVersionLink().get_link(Task("deploy"), ti_key=key) == "/gitops-ml/serving"
    assert ServingVersionLink().get_link(Task("train"), ti_key=key) == ""
    icon = client.get("/gitops-ml/static/gitops.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
