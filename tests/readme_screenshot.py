"""The README's screenshot of the GitOps page (``docs/img/gitops-page.png``), from a seeded history.

Two watched repositories (``tests/history_seed.py``: real Git commits, pipeline runs in a real
Airflow DB, model versions in a real MLflow registry, the run records), served by a real
``airflow api-server`` (the plugin loaded from ``plugins/``) and shot with the machine's Chromium
in a fixed time zone and locale, animations off, the page's "updated <time>" line hidden.
Everything lives in a temporary folder that is removed afterwards; the page shows only the seeded
values (repository URLs on a Git host, fixed commit times), so the same code gives the same
picture. The browser test keeps its own screenshots as test artifacts.

    .venv/bin/python -m tests.readme_screenshot [--out docs/img/gitops-page.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import BIN, ROOT, free_port

IMAGE = ROOT / "docs" / "img" / "gitops-page.png"
WATCHES = [
    {
        "name": "digits",
        "repo_url": "https://github.com/acme/digits-classifier.git",
        "branch": "main",
        "commits": 4,
        "failed_every": 4,
        "subject": "Tune the digits CNN",
    },
    {
        "name": "fashion",
        "repo_url": "https://github.com/acme/fashion-classifier.git",
        "branch": "main",
        "model_name": "fashion-classifier",
        "commits": 2,
        "failed_every": 10,
        "subject": "Fashion images, more epochs",
    },
]
SEED_FIELDS = ("commits", "failed_every", "subject")
HIDE_CLOCK = "#updated { visibility: hidden; }"  # the page's "updated <time of day>" line: the one moving part
VIEWPORT = {"width": 1500, "height": 1900}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=IMAGE)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gitops-readme-"))
    try:
        shoot(folder, args.out)
    except BaseException:
        log = folder / "api-server.log"
        print(log.read_text(errors="replace")[-3000:] if log.exists() else "no API server log")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


def shoot(folder: Path, out: Path) -> None:
    home, airflow_home = folder / "home", folder / "airflow"
    watch_file = folder / "watch.yaml"
    watch_file.write_text(
        json.dumps({"repositories": [{k: v for k, v in w.items() if k not in SEED_FIELDS} for w in WATCHES]})
    )
    (folder / "passwords.json").write_text(json.dumps({"ada": "ada-password"}))
    env = {
        "GITOPS_ML_HOME": str(home),
        "GITOPS_ML_WATCH_CONFIG": str(watch_file),
        "GITOPS_ML_SERVING_URL": "http://127.0.0.1:9",  # no model server runs: the page marks the replica
        "GITOPS_ML_MLFLOW_UI_URL": "http://127.0.0.1:5000",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder / "no-dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ada:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(folder / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": "readme-screenshot-jwt-secret-0123456789abcdef0123456789abcdef",
        "AIRFLOW__CORE__DEFAULT_TIMEZONE": "UTC",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    os.environ.update(env)
    for key in ("GITOPS_ML_REPO_URL", "ES_URL", "GITOPS_ML_KIBANA_URL"):
        os.environ.pop(key, None)
    (folder / "no-dags").mkdir()
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True)

    from gitops_ml import stack
    from gitops_ml.watch import get_watch
    from tests.history_seed import seed

    for watch in WATCHES:
        local = folder / "repositories" / watch["name"]
        local.parent.mkdir(parents=True, exist_ok=True)
        seed(
            get_watch(watch["name"]).run_settings(),
            watch["commits"],
            failed_every=watch["failed_every"],
            watch=watch["name"],
            local_repo=local,
            subject=watch["subject"],
        )

    port = free_port()
    log = open(folder / "api-server.log", "wb")  # closed after the server stops
    server = subprocess.Popen(
        [str(BIN / "airflow"), "api-server", "--port", str(port), "--host", "127.0.0.1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        stack.wait_http(f"{base}/api/v2/monitor/health", 180, "API server", folder / "api-server.log")
        import httpx

        token = httpx.post(f"{base}/auth/token", json={"username": "ada", "password": "ada-password"}, timeout=30)
        token.raise_for_status()
        _browse(base, token.json()["access_token"], out)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        log.close()


def _browse(base: str, token: str, out: Path) -> None:
    from tests.browser import chromium, gitops_frame

    with chromium() as browser:
        context = browser.new_context(viewport=VIEWPORT, color_scheme="light", locale="en-US", timezone_id="UTC")
        context.add_cookies([{"name": "_token", "value": token, "url": base}])
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.goto(f"{base}/plugin/gitops")
        try:
            frame = gitops_frame(page)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; browser errors: {problems}") from None
        frame.wait_for_selector("section[data-watch='fashion'] tr[data-sha]", timeout=60_000)
        page.wait_for_timeout(500)  # fonts and layout settle
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), style=HIDE_CLOCK, animations="disabled")
        context.close()


if __name__ == "__main__":
    raise SystemExit(main())
