"""A small client of Airflow's REST API (``/api/v2``): trigger a run named after a commit, follow it.

Authentication: ``AIRFLOW_API_USERNAME`` / ``AIRFLOW_API_PASSWORD`` get a JWT from
``/auth/token``; without them the client asks ``GET /auth/token``, which the simple
auth manager answers when ``simple_auth_manager_all_admins`` is on (the embedded demo).

Transient failures are retried with exponential backoff (``tenacity``), bounded by
``retry_seconds``: a 5xx answer (the embedded Airflow's SQLite answers 500 "Database error"
while another writer holds the lock) and a connection error or timeout.  A 4xx answer is
never retried: it is the answer (404 "no such run", 409 "already exists", 401/403).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    stop_before_delay,
    wait_exponential,
    wait_fixed,
)

from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError
from gitops_ml.runs import PIPELINE_DAG_ID, run_id_for

log = logging.getLogger(__name__)

TERMINAL = {"success", "failed"}
DEFAULT_URL = "http://127.0.0.1:8080"


def _transient(response: httpx.Response) -> bool:
    return response.status_code >= 500


def _poll(check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """``check()`` every ``interval`` seconds until it returns something other than None; None after ``timeout``."""
    return Retrying(
        retry=retry_if_result(lambda value: value is None),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry_error_callback=lambda state: None,
    )(check)


class AirflowClient:
    """``retry_seconds`` bounds the retries of one request (the first attempt included);
    ``backoff`` is the first wait, doubled after each attempt up to ``max_backoff``."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 30.0,
        retry_seconds: float = 60.0,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ):
        self.settings = Settings.from_env()
        self.base_url = (base_url or self.settings.airflow_api_url or DEFAULT_URL).rstrip("/")
        self.retry_seconds = retry_seconds
        self.attempts = 0  # attempts of the last request
        self.last_error = ""
        self._wait = wait_exponential(multiplier=backoff, max=max_backoff)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._http.headers["Authorization"] = f"Bearer {self._token()}"

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried while the answer is a 5xx or the connection fails.

        After the last attempt the last 5xx answer is returned (the caller's check names it);
        a connection error that persists raises ``GitopsMLError`` naming the URL.
        """

        def before_sleep(state: RetryCallState) -> None:
            outcome, next_action = state.outcome, state.next_action
            assert outcome is not None and next_action is not None  # tenacity sets both before sleeping
            why = (
                f"HTTP {outcome.result().status_code}"
                if not outcome.failed
                else f"{type(outcome.exception()).__name__}: {outcome.exception()}"
            )
            log.warning(
                "Airflow %s %s: %s (attempt %d); retrying in %.1f s",
                method,
                url,
                why,
                state.attempt_number,
                next_action.sleep,
            )

        def give_up(state: RetryCallState) -> httpx.Response | None:
            outcome = state.outcome
            assert outcome is not None  # tenacity gives up after an attempt
            if outcome.failed:
                self.last_error = f"{type(outcome.exception()).__name__}: {outcome.exception()}"
                return None
            return outcome.result()

        retrying = Retrying(
            retry=retry_if_result(_transient) | retry_if_exception_type(httpx.TransportError),
            stop=stop_before_delay(self.retry_seconds),
            wait=self._wait,
            before_sleep=before_sleep,
            retry_error_callback=give_up,
        )
        response = retrying(self._http.request, method, url, **kwargs)
        if response is None:
            raise GitopsMLError(
                f"Airflow at {self.base_url} did not answer {method} {url}: the connection "
                f"failed on every attempt for {self.retry_seconds:g} s "
                f"(last: {self.last_error})"
            )
        self.attempts = retrying.statistics.get("attempt_number", 1)
        return response

    def _token(self) -> str:
        user, password = self.settings.airflow_api_username, self.settings.airflow_api_password.get_secret_value()
        if user and password:
            response = self._request("POST", "/auth/token", json={"username": user, "password": password})
        else:
            response = self._request("GET", "/auth/token")
        if response.status_code >= 400:
            raise GitopsMLError(
                f"Airflow at {self.base_url} refused a token (HTTP {response.status_code}); "
                "set AIRFLOW_API_USERNAME and AIRFLOW_API_PASSWORD"
            )
        return response.json()["access_token"]

    def _check(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 400:
            raise GitopsMLError(f"Airflow refused to {what}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def wait_for_dag(self, dag_id: str = PIPELINE_DAG_ID, timeout: float = 120.0) -> None:
        if not _poll(lambda: self._request("GET", f"/api/v2/dags/{dag_id}").status_code == 200 or None, timeout):
            raise GitopsMLError(f"DAG {dag_id} did not appear in Airflow at {self.base_url} within {timeout:.0f} s")

    def unpause(self, dag_id: str = PIPELINE_DAG_ID) -> None:
        self._check(self._request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}), f"unpause {dag_id}")

    def get_run(self, run_id: str, dag_id: str = PIPELINE_DAG_ID) -> dict[str, Any] | None:
        response = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return None if response.status_code == 404 else self._check(response, f"read run {run_id}")

    def trigger_commit(
        self,
        commit_sha: str,
        conf: dict[str, Any] | None = None,
        rerun: bool = False,
        dag_id: str = PIPELINE_DAG_ID,
        watch: str | None = None,
    ) -> dict[str, Any]:
        """Start the pipeline for ``commit_sha`` as run ``commit__<sha>``; an existing run is returned as is.

        ``rerun=True`` starts another run for the same commit (``commit__<sha>__rerun_<time>``).
        """
        run_id = run_id_for(commit_sha, f"rerun_{time.strftime('%Y%m%dT%H%M%S')}" if rerun else None, watch=watch)
        existing = None if rerun else self.get_run(run_id, dag_id)
        if existing:
            return existing
        body = {
            "dag_run_id": run_id,
            "logical_date": None,
            "conf": {**(conf or {}), "commit_sha": commit_sha, **({"watch": watch} if watch else {})},
            "note": f"commit {commit_sha}",
        }
        response = self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        # 409: the watcher or the webhook created it meanwhile, or (after a retried 5xx) our own
        # first attempt did; either way this run id is the one run.
        if response.status_code == 409 and (not rerun or self.attempts > 1):
            return self._check(self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"), f"read run {run_id}")
        return self._check(response, f"trigger {run_id}")

    def task_instances(self, run_id: str, dag_id: str = PIPELINE_DAG_ID) -> list[dict[str, Any]]:
        data = self._check(
            self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"), f"list tasks of {run_id}"
        )
        return data["task_instances"]

    def wait_for_run(
        self, run_id: str, timeout: float = 900.0, dag_id: str = PIPELINE_DAG_ID, on_change=None
    ) -> dict[str, Any]:
        """The run once it ended; ``on_change(task_id, state)`` is called for every task state seen change."""
        seen: dict[str, str] = {}

        def ended() -> dict[str, Any] | None:
            run = self.get_run(run_id, dag_id)
            if on_change is not None:
                for ti in self.task_instances(run_id, dag_id):
                    state = ti.get("state") or "none"
                    if seen.get(ti["task_id"]) != state:
                        seen[ti["task_id"]] = state
                        on_change(ti["task_id"], state)
            return run if run and run["state"] in TERMINAL else None

        run = _poll(ended, timeout)
        if run is None:
            raise GitopsMLError(f"run {run_id} did not finish within {timeout:.0f} s")
        return run
