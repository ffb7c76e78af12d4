"""The values a pipeline run hands from step to step (Airflow XCom), typed.

Each model is dumped to a small JSON-able dict at the XCom boundary (``model_dump(mode="json")``)
and validated when a task reads it back (``model_validate``): a payload of the wrong shape fails
with the field it lacks instead of a ``KeyError`` three calls later.  XCom carries URIs, hashes,
metrics and names, never arrays or models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from gitops_ml.errors import InputError

__all__ = [
    "Commit",
    "Deployed",
    "Evaluated",
    "LocalRun",
    "Payload",
    "Prepared",
    "Pulled",
    "Registered",
    "Resolved",
    "RunConf",
    "RunIds",
    "Trained",
]


class Payload(BaseModel):
    """A step's result: immutable; a field it does not declare is an error, not silently carried along."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The JSON-able dict XCom stores."""
        return self.model_dump(mode="json")


class Commit(Payload):
    """One commit of the tracked branch: the key of every later step.

    ``repo_url`` is stored without credentials; the caller keeps the real URL.
    """

    repo_url: str
    branch: str
    commit_sha: str
    message: str
    author: str
    committed_at: str


class RunIds(Payload):
    """The orchestrator's names of the run (``local`` for ``gitops-ml run --local``)."""

    airflow_dag_id: str | None
    airflow_run_id: str | None


class Resolved(Payload):
    """``resolve``: the commit, the version already registered for it, the signature policy's warning;
    ``run`` (the orchestrator's ids) once the run has started (``flow.start``)."""

    commit: Commit
    existing_version: str | None = None
    signature_warning: str | None = None
    run: RunIds | None = None


class Prepared(Payload):
    """``prepare``: the commit's work tree, its validated ``params.yaml``, the hash of everything a model
    depends on, the hash of the commit's model code (none: the built-in model), and a registered
    version built from the same inputs (reused instead of retrained)."""

    workdir: str
    params: dict[str, Any]
    inputs_hash: str
    model_code_hash: str | None = None
    reuse_version: str | None = None


class Pulled(Payload):
    """``pull_data``: the verified image folder of the commit and what it holds; the hash of the
    pretrained weights its model code loads (``model.weights``), when it names any."""

    path: str
    data_hash: str
    nfiles: int
    pointer: str
    class_names: list[str]
    class_counts: dict[str, int]
    weights_hash: str | None = None


class Trained(Payload):
    """``train``: the MLflow run and the logged model."""

    run_id: str
    model_uri: str
    experiment_id: str
    train_seconds: float
    train_peak_rss_mb: float
    final_train_accuracy: float


class Evaluated(Payload):
    """``evaluate``: the challenger's score, the champion's on the same images, the gate's decision."""

    test_accuracy: float
    n_test: int
    champion_version: str | None
    champion_accuracy: float | None
    gate_passed: bool
    gate_reasons: list[str]


class Registered(Payload):
    """``register``: the new model version and its gate."""

    model_version: str
    gate_passed: bool
    gate_reasons: list[str]


class Deployed(Payload):
    """``deploy``: whether the champion changed, what it replaced, what every server reports, the watch
    window; ``superseded_by`` when a newer commit already serves (nothing moved)."""

    model_version: str
    changed: bool
    previous_version: str | None
    serving: dict[str, Any] | None = None
    watch: dict[str, Any] | None = None
    superseded_by: str | None = None
    recovered_from_run: str | None = None


class LocalRun(Payload):
    """What ``gitops-ml run --local`` did: the commit, the version it built or reused, the deploy, and the
    run's final outcome (``skipped`` when a rule stopped it first, e.g. the watch decision)."""

    commit: Commit | None = None
    skipped: str | None = None
    data_hash: str | None = None
    model_version: str | None = None
    reused: bool = False
    gate_passed: bool | None = None
    gate_reasons: list[str] = []
    test_accuracy: float | None = None
    mlflow_run_id: str | None = None
    deploy: Deployed | None = None
    outcome: dict[str, Any] | None = None


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
