"""The values a pipeline run hands from step to step (Airflow XCom), typed.

Each model is dumped to a small JSON-able dict at the XCom boundary (``model_dump(mode="json")``)
and validated when a task reads it back (``model_validate``): a payload of the wrong shape fails
with the field it lacks instead of a ``KeyError`` three calls later.  XCom carries URIs, hashes,
metrics and names, never arrays or models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from gitops_ml.errors import InputError

__all__ = ["RunConf"]


class RunConf(BaseModel):
    """The conf of a pipeline run (the DAG's params), from the watcher, the webhook, the CLI or a user.

    :param commit_sha: the commit to build (a prefix is resolved; none: the head of the branch).
    :param repo_url: the model repository without credentials (none: ``GITOPS_ML_REPO_URL``).
    :param branch: the tracked branch (none: ``GITOPS_ML_BRANCH``).
    :param watch: the watched repository the run belongs to (its URL, branch, model name, policy).
    :param trigger: push | webhook | schedule | manual.
    :param decision: the watcher's: ``no_retrain`` and ``rejected`` record ``reason`` and run nothing.
    :param reason: why the watcher decided so.
    :param signature_warning: the signature policy's warning the watcher saw (checked again at resolve).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    commit_sha: str | None = None
    repo_url: str | None = None
    branch: str | None = None
    watch: str | None = None
    trigger: str | None = None
    decision: Literal["train", "no_retrain", "rejected"] | None = None
    reason: str | None = None
    signature_warning: str | None = None

    @classmethod
    def parse(cls, conf: dict | None) -> RunConf:
        """``conf`` validated; ``InputError`` naming the field otherwise (a run conf is untrusted)."""
        try:
            return cls.model_validate({k: v for k, v in (conf or {}).items() if v not in ("", None)})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InputError(f"run conf: {problems}") from None
