"""Deploy: move the ``champion`` alias, make the running server load it, confirm, or roll back.

A reconcile step in the spirit of Flux: the desired state is the registry alias,
the observed state is what the server reports at ``/version``.  The step ends
with both agreeing on the new version, or with both back on the previous one
and a ``DeployError`` that says why.
"""

from __future__ import annotations

import logging
import time

import httpx

from gitops_ml.config import Settings
from gitops_ml.errors import DeployError

log = logging.getLogger(__name__)


class ServingClient:
    """HTTP client of a running ``gitops-ml serve``."""

    def __init__(self, settings: Settings, timeout: float = 10.0):
        self.base_url = settings.serving_url
        headers = {"Authorization": f"Bearer {settings.serving_token}"} if settings.serving_token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def version(self) -> dict | None:
        """What the server serves now (``None`` when it serves nothing yet)."""
        response = self._http.get("/version")
        if response.status_code == 503:
            return None
        response.raise_for_status()
        return response.json()

    def reload(self, model_version: str | None, timeout: float) -> dict:
        """Ask the server to load ``model_version`` (``None``: the current champion) and switch to it."""
        response = self._http.post("/admin/reload", json={"model_version": model_version}, timeout=timeout)
        if response.status_code != 200:
            raise DeployError(f"server {self.base_url} refused to load model version {model_version}: "
                              f"HTTP {response.status_code} {_error_text(response)}")
        return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:500]


def deploy(settings: Settings, model_version: str, commit_sha: str) -> dict:
    """Promote ``model_version`` to champion and converge the server on it; roll back on any failure."""
    from gitops_ml import registry  # noqa: PLC0415 - mlflow is heavy

    previous = registry.get_alias(settings)
    previous_version = previous.version if previous is not None else None
    serving = ServingClient(settings)
    try:
        try:
            observed = serving.version()
        except httpx.HTTPError as exc:
            raise DeployError(f"serving endpoint {settings.serving_url} is not reachable ({exc}); "
                              f"model version {model_version} was not deployed") from None
        if previous_version == str(model_version) and observed and observed.get("model_version") == str(model_version):
            log.info("model version %s (commit %s) is already champion and serving", model_version, commit_sha)
            return {"changed": False, "previous_version": previous_version, "serving": observed}
        registry.set_alias(settings, model_version)
        try:
            serving.reload(str(model_version), timeout=settings.deploy_timeout)
            observed = _wait_for(serving, str(model_version), commit_sha, settings.deploy_timeout)
        except (DeployError, httpx.HTTPError) as exc:
            _roll_back(settings, serving, previous_version)
            raise DeployError(f"deploy of model version {model_version} (commit {commit_sha}) failed and was "
                              f"rolled back to version {previous_version}: {exc}") from None
        log.info("serving model version %s of commit %s at %s", model_version, commit_sha, settings.serving_url)
        return {"changed": True, "previous_version": previous_version, "serving": observed}
    finally:
        serving.close()


def _wait_for(serving: ServingClient, model_version: str, commit_sha: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    observed: dict | None = None
    while time.monotonic() < deadline:
        observed = serving.version()
        if observed and observed.get("model_version") == model_version and observed.get("commit_sha") == commit_sha:
            return observed
        time.sleep(0.2)
    raise DeployError(f"server still reports {observed} after {timeout:.0f} s, "
                      f"expected version {model_version} of commit {commit_sha}")


def _roll_back(settings: Settings, serving: ServingClient, previous_version: str | None) -> None:
    from gitops_ml import registry  # noqa: PLC0415

    registry.set_alias(settings, previous_version)
    if previous_version is None:
        return
    try:
        serving.reload(previous_version, timeout=settings.deploy_timeout)
    except (DeployError, httpx.HTTPError) as exc:
        log.error("rollback: server did not reload previous version %s: %s", previous_version, exc)
