"""Serving and deploying a model version.

- ``server``: the model server (``gitops-ml serve``), on Starlette and uvicorn.
- ``client``: ``ServingClient``, the HTTP client of a running server.
- ``controller``: ``deploy``, the reconcile of the registry alias and what the servers report.
- ``metrics``: the server's Prometheus metrics and their parser.

Importing this package loads none of them: ``deploy`` is loaded on first use, so
``import gitops_ml.deploy.server`` does not pull the controller or its HTTP client in.
"""

from __future__ import annotations

from typing import Any

from gitops_ml.errors import DeployError

__all__ = ["DeployError", "deploy"]


def __getattr__(name: str) -> Any:
    if name == "deploy":
        from gitops_ml.deploy.controller import deploy  # noqa: PLC0415 - on first use only

        return deploy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
