"""The GitOps page in a real browser (Playwright driving Debian's Chromium) against the live embedded
stack (``airflow standalone`` + MLflow + the model server, the demo repository watched every second).

One story, screenshot at each state (``<tmp>/screenshots/*.png``, test artifacts; the README's
screenshot comes from a seeded history instead, ``python -m tests.readme_screenshot``):

1. the demo's first commit trains and is promoted: the page lists it, version 1, serving;
2. two new commits pushed back to back appear (running, task by task); the first goes live;
3. the second, whose gate fails (``gate.min_accuracy`` 0.9999), shows NOT PROMOTED and the reasons;
4. the roll-back button on version 1 moves serving back (checked on the server's ``/version``) and the
   rollback row appears; the page follows the UI's dark theme;
5. a second API server of the same stack with authentication on (simple auth manager, no
   all-admins): anonymous requests are refused, a viewer sees the page read-only and may not roll back.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from gitops_ml import demo, stack
from gitops_ml.airflow.client import AirflowClient
from tests.browser import chromium, gitops_frame
from tests.helpers import BIN, free_port

pytestmark = pytest.mark.e2e

DEFAULT = "section[data-watch='default']"  # the demo repository's section of the page


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


def row(frame, commit_sha):
    return frame.locator(f"tr[data-sha='{commit_sha}']")


def wait_row(frame, commit_sha, timeout=600, **attributes):
    """Wait until the row of ``commit_sha`` carries ``attributes`` (``data-<name>`` values) after polling."""
    selector = f"tr[data-sha='{commit_sha}']" + "".join(
        f"[data-{k.replace('_', '-')}='{v}']" for k, v in attributes.items()
    )
    frame.wait_for_selector(selector, timeout=timeout * 1000)
    return frame.locator(selector)


def shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def served(serving_url) -> dict:
    return httpx.get(serving_url + "/version", timeout=10).json()


def auth_api_server(settings, live_stack, tmp_path, port) -> tuple[subprocess.Popen, dict[str, str]]:
    """A second ``airflow api-server`` of the same stack (same DB, plugins, MLflow, server), authentication on."""
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"vera": "viewer-password", "otto": "operator-password"}))
    ports = {
        f"{name}_port": int(live_stack[key].rsplit(":", 1)[1])
        for name, key in (("mlflow", "mlflow"), ("serve", "serving"))
    }
    env = {
        **os.environ,
        **stack.airflow_env(stack.stack_settings(settings, airflow_port=port, **ports), port),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "vera:viewer,otto:user",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": "gitops-page-test-jwt-secret-0123456789abcdef0123456789abcdef",
    }
    log = open(tmp_path / "auth-api.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "airflow"), "api-server", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.wait_http(
        f"http://127.0.0.1:{port}/api/v2/monitor/health", 120, "API server with auth", tmp_path / "auth-api.log"
    )
    return proc, {"viewer": ("vera", "viewer-password"), "operator": ("otto", "operator-password")}


@pytest.mark.timeout(3600)  # three trainings through the live scheduler: minutes each on a loaded machine
def test_gitops_page_in_a_real_browser(settings, demo_repo, live_stack, browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    client = AirflowClient(live_stack["airflow"])
    client.wait_for_dag()
    first_sha = demo_repo["commit_sha"]
    first = client.wait_for_run(f"commit__{first_sha}", timeout=1500)  # a loaded 2-core machine: minutes
    assert first["state"] == "success", first

    context = browser.new_context(viewport={"width": 1500, "height": 1000}, color_scheme="light")
    page = context.new_page()
    page.goto(live_stack["airflow"] + "/plugin/gitops")
    frame = gitops_frame(page)
    # 1. The demo's commit: trained, version 1, promoted and serving.
    first_row = wait_row(
        frame, first_sha, timeout=60, run_state="success", decision="trained", version="1", deploy="promoted"
    )
    assert "serving" in first_row.inner_text()
    assert "worst class" in first_row.inner_text()  # the per-class recall the evaluation tagged (no floor set)
    assert frame.locator(f"{DEFAULT} .serving-version").get_attribute("data-version") == "1"
    assert frame.locator(f"{DEFAULT} .serving-commit").get_attribute("data-sha") == first_sha
    assert frame.locator(f"{DEFAULT} .replicas [data-agrees='true']").count() == 1
    assert frame.evaluate("document.documentElement.dataset.theme") == "light"
    shot(page, shots, "1-first-commit-serving")

    # 2.+3. Two commits pushed back to back: one that trains a good model, one whose gate fails
    # (``gate.min_accuracy`` 0.9999). Both appear, run task by task (in either order), the good one
    # goes live, the other shows NOT PROMOTED with the gate's reasons.
    second_sha = demo.bump_param(demo_repo["path"], "train.seed", 7, "Another seed for the digits CNN")
    failed_sha = demo.bump_param(demo_repo["path"], "gate.min_accuracy", 0.9999, "Demand 99.99 % accuracy")
    wait_row(frame, second_sha, timeout=600)
    wait_row(frame, failed_sha, timeout=120)
    shot(page, shots, "2-new-commits-appear")
    second_row = wait_row(frame, second_sha, timeout=1500, run_state="success", deploy="promoted")
    second_version = second_row.get_attribute("data-version")
    assert second_version not in ("", "1") and "Another seed" in second_row.inner_text()
    failed_row = wait_row(frame, failed_sha, timeout=1500, run_state="success", deploy="not_promoted")
    frame.wait_for_selector(f"{DEFAULT} .serving-version[data-version='{second_version}']", timeout=60_000)
    assert served(live_stack["serving"])["commit_sha"] == second_sha
    text = failed_row.inner_text()
    assert "FAILED" in text and "below gate.min_accuracy 0.9999" in text, text
    assert failed_row.locator("[data-rollback]").count() == 0  # a failed version is never offered
    shot(page, shots, "3-new-commit-live-gate-failed")

    # 4. Roll back to version 1 from its row: the server serves it again, the rollback row appears.
    assert row(frame, second_sha).locator("[data-rollback]").count() == 0  # the champion itself
    row(frame, first_sha).locator("[data-rollback='1']").click()
    frame.locator("[data-confirm='1']").click()
    frame.wait_for_selector("tr[data-action='rolled back'][data-version='1']", timeout=180_000)
    now = served(live_stack["serving"])
    assert now["model_version"] == "1" and now["commit_sha"] == first_sha, now
    assert frame.locator(f"{DEFAULT} .serving-version").get_attribute("data-version") == "1"
    wait_row(frame, second_sha, timeout=30, deploy="rolled_back")
    shot(page, shots, "4-rolled-back")
    context.close()

    # Dark theme: the UI's own setting (next-themes' "theme" in localStorage, as its toggle writes it).
    dark = browser.new_context(viewport={"width": 1500, "height": 1000}, color_scheme="dark")
    dark.add_init_script("window.localStorage.setItem('theme', 'dark')")
    dark_page = dark.new_page()
    dark_page.goto(live_stack["airflow"] + "/plugin/gitops")
    dark_frame = gitops_frame(dark_page)
    assert dark_page.evaluate(
        "document.documentElement.classList.contains('dark') || document.documentElement.dataset.theme === 'dark'"
    ), dark_page.evaluate("document.documentElement.outerHTML.slice(0, 300)")
    dark_frame.wait_for_function("document.documentElement.dataset.theme === 'dark'", timeout=10_000)
    background = dark_frame.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background != "rgb(255, 255, 255)", background
    shot(dark_page, shots, "5-dark-theme")
    dark.close()

    # The page is linked from each DAG's page (a tab) and from each run's page.
    plugins = client._check(client._http.get("/api/v2/plugins"), "plugins")["plugins"]
    views = {(v["destination"], v.get("url_route")) for p in plugins for v in p["external_views"]}
    assert {("nav", "gitops"), ("dag", "gitops-dag"), ("dag_run", "gitops-run")} <= views, views

    # 5. Authentication on: anonymous refused, a viewer reads only, a user who may trigger may roll back.
    port = free_port()
    proc, users = auth_api_server(settings, live_stack, tmp_path, port)
    try:
        base = f"http://127.0.0.1:{port}"
        anonymous = browser.new_context()
        anon_page = anonymous.new_page()
        response = anon_page.goto(base + "/gitops-ml/ui")
        assert response.status == 401, response.status
        anon_page.goto(base + "/plugin/gitops")
        anon_page.wait_for_url("**/auth/login**", timeout=30_000)  # the UI sends an anonymous user to log in
        shot(anon_page, shots, "6-anonymous-refused")
        assert httpx.get(base + "/gitops-ml/api/history").status_code == 401
        assert httpx.post(base + "/gitops-ml/api/deploy", json={"model_version": second_version}).status_code == 401
        anonymous.close()

        def token(role):
            username, password = users[role]
            answer = httpx.post(base + "/auth/token", json={"username": username, "password": password})
            assert answer.status_code == 201, answer.text
            return answer.json()["access_token"]

        viewer = browser.new_context(viewport={"width": 1500, "height": 1000})
        viewer.add_cookies([{"name": "_token", "value": token("viewer"), "url": base}])
        viewer_page = viewer.new_page()
        viewer_page.goto(base + "/plugin/gitops")
        viewer_frame = gitops_frame(viewer_page)
        viewer_frame.wait_for_selector(f"tr[data-sha='{second_sha}']", timeout=30_000)
        assert viewer_frame.locator("[data-rollback]").count() == 0
        assert "read-only" in viewer_frame.locator(f"tr[data-sha='{second_sha}']").inner_text()
        shot(viewer_page, shots, "7-viewer-read-only")
        viewer.close()
        refused = httpx.post(
            base + "/gitops-ml/api/deploy",
            json={"model_version": second_version},
            headers={"Authorization": f"Bearer {token('viewer')}"},
        )
        assert refused.status_code == 403, refused.text
        assert served(live_stack["serving"])["model_version"] == "1"
        as_form = httpx.post(
            base + "/gitops-ml/api/deploy",
            data={"model_version": second_version},
            headers={"Authorization": f"Bearer {token('operator')}"},
        )
        assert as_form.status_code == 415  # only JSON (a cross-site form cannot send it)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
