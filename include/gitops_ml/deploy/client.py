"""HTTP client of a running ``gitops-ml serve``: what it serves, its metrics, and the admin reload."""

from __future__ import annotations

from typing import Any

import httpx

from gitops_ml.config import Settings
from gitops_ml.deploy import metrics
from gitops_ml.errors import DeployError

__all__ = ["ServingClient"]


class ServingClient:
    """One model server, reached at ``base_url`` (default: the first of ``settings.serving_urls``).

    :param settings: ``serving_urls`` and ``serving_token`` (sent as ``Authorization: Bearer``).
    :param timeout: seconds per request (a reload passes its own).
    :param base_url: the server to talk to, when not the first configured one.
    """

    def __init__(self, settings: Settings, timeout: float = 10.0, base_url: str | None = None):
        self.base_url = base_url or settings.serving_urls[0]
        headers = (
            {"Authorization": f"Bearer {settings.serving_token.get_secret_value()}"} if settings.serving_token else {}
        )
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def version(self) -> dict | None:
        """What the server serves now (``None`` when it serves nothing yet)."""
        response = self._http.get("/version")
        if response.status_code == 503:
            return None
        response.raise_for_status()
        return response.json()

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """The server's ``/metrics`` samples (see ``metrics.parse``)."""
        response = self._http.get("/metrics")
        response.raise_for_status()
        return metrics.parse(response.text)

    def reload(self, model_version: str | None, timeout: float, smoke: dict | None = None) -> dict:
        """Ask the server to load ``model_version`` (``None``: the champion), check ``smoke``, switch."""
        body: dict[str, Any] = {"model_version": model_version}
        if smoke:
            body["smoke"] = {"images": smoke["images"], "classes": smoke["classes"]}
        response = self._http.post("/admin/reload", json=body, timeout=timeout)
        if response.status_code != 200:
            raise DeployError(
                f"server {self.base_url} did not switch to model version {model_version}: "
                f"HTTP {response.status_code} {_error_text(response)}"
            )
        return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:500]
