"""A small client of Airflow's REST API (``/api/v2``): trigger a run named after a commit, follow it.

Authentication: ``AIRFLOW_API_USERNAME`` / ``AIRFLOW_API_PASSWORD`` get a JWT from
``/auth/token``; without them the client asks ``GET /auth/token``, which the simple
auth manager answers when ``simple_auth_manager_all_admins`` is on (the embedded demo).
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from gitops_ml.airflow.steps import PIPELINE_DAG_ID, run_id_for
from gitops_ml.errors import GitopsMLError

TERMINAL = {"success", "failed"}


class AirflowClient:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0):
        self.base_url = (base_url or os.environ.get("AIRFLOW_API_URL") or "http://127.0.0.1:8080").rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._http.headers["Authorization"] = f"Bearer {self._token()}"

    def _token(self) -> str:
        user, password = os.environ.get("AIRFLOW_API_USERNAME"), os.environ.get("AIRFLOW_API_PASSWORD")
        if user and password:
            response = self._http.post("/auth/token", json={"username": user, "password": password})
        else:
            response = self._http.get("/auth/token")
        if response.status_code >= 400:
            raise GitopsMLError(f"Airflow at {self.base_url} refused a token (HTTP {response.status_code}); "
                                "set AIRFLOW_API_USERNAME and AIRFLOW_API_PASSWORD")
        return response.json()["access_token"]

    def _check(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 400:
            raise GitopsMLError(f"Airflow refused to {what}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def wait_for_dag(self, dag_id: str = PIPELINE_DAG_ID, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._http.get(f"/api/v2/dags/{dag_id}").status_code == 200:
                return
            time.sleep(1)
        raise GitopsMLError(f"DAG {dag_id} did not appear in Airflow at {self.base_url} within {timeout:.0f} s")

    def unpause(self, dag_id: str = PIPELINE_DAG_ID) -> None:
        self._check(self._http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}), f"unpause {dag_id}")

    def get_run(self, run_id: str, dag_id: str = PIPELINE_DAG_ID) -> dict[str, Any] | None:
        response = self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return None if response.status_code == 404 else self._check(response, f"read run {run_id}")

    def trigger_commit(self, commit_sha: str, conf: dict[str, Any] | None = None, rerun: bool = False,
                       dag_id: str = PIPELINE_DAG_ID, watch: str | None = None) -> dict[str, Any]:
        """Start the pipeline for ``commit_sha`` as run ``commit__<sha>``; an existing run is returned as is.

        ``rerun=True`` starts another run for the same commit (``commit__<sha>__rerun_<time>``).
        """
        run_id = run_id_for(commit_sha, f"rerun_{time.strftime('%Y%m%dT%H%M%S')}" if rerun else None, watch=watch)
        existing = None if rerun else self.get_run(run_id, dag_id)
        if existing:
            return existing
        body = {"dag_run_id": run_id, "logical_date": None,
                "conf": {**(conf or {}), "commit_sha": commit_sha, **({"watch": watch} if watch else {})},
                "note": f"commit {commit_sha}"}
        response = self._http.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        if response.status_code == 409 and not rerun:  # the watcher or the webhook created it meanwhile
            return self._check(self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"), f"read run {run_id}")
        return self._check(response, f"trigger {run_id}")

    def task_instances(self, run_id: str, dag_id: str = PIPELINE_DAG_ID) -> list[dict[str, Any]]:
        data = self._check(self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"),
                           f"list tasks of {run_id}")
        return data["task_instances"]

    def wait_for_run(self, run_id: str, timeout: float = 900.0, dag_id: str = PIPELINE_DAG_ID,
                     on_change=None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            run = self.get_run(run_id, dag_id)
            if on_change is not None:
                for ti in self.task_instances(run_id, dag_id):
                    state = ti.get("state") or "none"
                    if seen.get(ti["task_id"]) != state:
                        seen[ti["task_id"]] = state
                        on_change(ti["task_id"], state)
            if run and run["state"] in TERMINAL:
                return run
            time.sleep(1)
        raise GitopsMLError(f"run {run_id} did not finish within {timeout:.0f} s")
