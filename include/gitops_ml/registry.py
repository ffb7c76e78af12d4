"""MLflow: training runs, model versions with lineage tags, aliases.

The only module that imports mlflow, and no MLflow object leaves it: model versions
and training runs are returned as plain frozen data classes (``ModelVersion``,
``TrainingRun``).  A model version is created in one call with all its lineage tags
(no half-tagged version), and at most one version exists per (commit SHA, data hash).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import mlflow
from mlflow import MlflowClient
from mlflow.entities import SourceType
from mlflow.exceptions import MlflowException
from mlflow.utils import mlflow_tags

from gitops_ml.config import Settings
from gitops_ml.errors import RegistryError
from gitops_ml.polling import poll

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "META_ARTIFACT",
    "MODEL_ARTIFACT",
    "MODEL_CODE_ARTIFACT",
    "SERVING_ARTIFACT",
    "TAG_PREFIX",
    "ModelVersion",
    "TrainingRun",
    "champion_summary",
    "experiment_id",
    "find_training_run",
    "find_version",
    "find_version_by_tag",
    "get_alias",
    "get_run",
    "get_version",
    "git_source_tags",
    "lineage_tags",
    "load_logged_model",
    "load_model",
    "load_predictor",
    "load_run_json",
    "log_evaluation",
    "log_training",
    "register",
    "run_url",
    "served_for",
    "serving_commit",
    "set_alias",
    "set_version_tags",
    "version_summaries",
    "version_tags",
]

log = logging.getLogger(__name__)

TAG_PREFIX = "gitops_ml."
CHAMPION = "champion"
CHALLENGER = "challenger"
META_ARTIFACT = "gitops_ml_meta.json"
MODEL_ARTIFACT = "model"
SERVING_ARTIFACT = "serving_model"  # the code-free TF SavedModel the server and the evaluation load
MODEL_CODE_ARTIFACT = "model_code"  # the commit's model code files, as they were trained


@dataclass(frozen=True)
class ModelVersion:
    """A registered version of a model, as plain data.

    :param version: the version number, as a string (``"3"``).
    :param run_id: the MLflow run that logged the model.
    :param source: where the model's artifacts are (``models:/m-...``).
    :param status: ``READY``, ``PENDING_REGISTRATION`` or ``FAILED_REGISTRATION``.
    :param tags: every tag of the version, prefixes included (``version_tags`` strips ours).
    :param aliases: the aliases naming this version (``champion``, ``challenger``).
    :param created: when the version was registered (UTC).
    """

    name: str
    version: str
    run_id: str
    source: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created: datetime | None = None


@dataclass(frozen=True)
class TrainingRun:
    """An MLflow run, as plain data: its ids, tags and latest metric values."""

    run_id: str
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _model_version(found) -> ModelVersion:
    created = found.creation_timestamp
    return ModelVersion(
        name=found.name,
        version=str(found.version),
        run_id=found.run_id or "",
        source=found.source or "",
        status=found.status,
        tags=dict(found.tags or {}),
        aliases=tuple(found.aliases or ()),
        created=datetime.fromtimestamp(created / 1000, UTC) if created else None,
    )


def _training_run(run) -> TrainingRun:
    return TrainingRun(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
    )


def client(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store (creating the embedded SQLite folder if needed)."""
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def experiment_id(settings: Settings) -> str:
    mlc = client(settings)
    experiment = mlc.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = settings.artifact_root if settings.tracking_uri.startswith("sqlite:") else None
    if location:
        Path(location).mkdir(parents=True, exist_ok=True)
    try:
        return mlc.create_experiment(settings.experiment_name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        existing = mlc.get_experiment_by_name(settings.experiment_name)
        assert existing is not None  # the name was taken: the experiment exists
        return existing.experiment_id


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """``{"commit_sha": ...}`` -> ``{"gitops_ml.commit_sha": ...}`` (values as strings, None dropped)."""
    return {f"{TAG_PREFIX}{k}": str(v) for k, v in lineage.items() if v is not None}


def git_source_tags(commit_sha: str, branch: str, repo_url: str) -> dict[str, str]:
    """MLflow's standard source tags of a run built from a Git commit (``mlflow.source.git.*``)."""
    return {
        mlflow_tags.MLFLOW_GIT_COMMIT: commit_sha,
        mlflow_tags.MLFLOW_GIT_BRANCH: branch,
        mlflow_tags.MLFLOW_GIT_REPO_URL: repo_url,
        mlflow_tags.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB),
    }


def _ready_versions_tagged(settings: Settings, key: str, value: str) -> list[ModelVersion]:
    query = f"name = '{settings.model_name}' and tags.`{TAG_PREFIX}{key}` = '{value}'"
    try:
        versions = client(settings).search_model_versions(query)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return []
        raise
    return sorted((_model_version(v) for v in versions if v.status == "READY"), key=lambda v: int(v.version))


def find_version(settings: Settings, commit_sha: str, data_hash: str | None = None) -> ModelVersion | None:
    """The registered version built from ``commit_sha`` (and ``data_hash`` when given), if any."""
    versions = _ready_versions_tagged(settings, "commit_sha", commit_sha)
    if data_hash is not None:
        versions = [v for v in versions if v.tags.get(f"{TAG_PREFIX}data_hash") == data_hash]
    return versions[0] if versions else None


def find_version_by_tag(settings: Settings, key: str, value: str) -> ModelVersion | None:
    """The oldest READY version of the model whose ``gitops_ml.<key>`` tag equals ``value``."""
    versions = _ready_versions_tagged(settings, key, value)
    return versions[0] if versions else None


def log_training(
    settings: Settings,
    run_name: str,
    run_tags: dict[str, str],
    params: dict[str, Any],
    model,
    history: dict[str, list[float]],
    meta: dict[str, Any],
    input_example,
    serving_dir: str | None = None,
    code_files: dict[str, str] | None = None,
) -> dict[str, str]:
    """Create the MLflow run of one training: params, per-epoch metrics, the Keras model, metadata,
    the code-free serving artifact (``serving_dir``, under ``serving_model/``) and the model code
    (``code_files``: repository path -> local file, under ``model_code/``).

    The model is logged with an explicit signature.  mlflow 3.17's ``log_model(input_example=...)``
    writes the example before the model folder exists (mlflow issue #16183), so the example is
    stored next to the model as ``input_example.json`` instead.
    """
    import numpy as np  # noqa: PLC0415
    from mlflow.models import ModelSignature  # noqa: PLC0415
    from mlflow.types.schema import Schema, TensorSpec  # noqa: PLC0415

    exp_id = experiment_id(settings)
    h, w, c = input_example.shape[1:]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, h, w, c), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(meta["class_names"])), "probabilities")]),
    )
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
        mlflow.log_params(params)
        for key, values in history.items():
            for step, value in enumerate(values):
                mlflow.log_metric(key, value, step=step)
        info = mlflow.keras.log_model(
            model,
            name=MODEL_ARTIFACT,
            signature=signature,
            pip_requirements=[f"tensorflow-cpu=={_version('tensorflow-cpu')}", f"keras=={_version('keras')}"],
        )
        mlflow.log_dict(meta, META_ARTIFACT)
        mlflow.log_dict({"inputs": input_example.tolist()}, "input_example.json")
        if serving_dir:
            mlflow.log_artifacts(serving_dir, SERVING_ARTIFACT)
        for relpath, local in sorted((code_files or {}).items()):
            folder = os.path.dirname(relpath)
            mlflow.log_artifact(local, f"{MODEL_CODE_ARTIFACT}/{folder}" if folder else MODEL_CODE_ARTIFACT)
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "experiment_id": exp_id}


def _version(package: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(package)


def log_evaluation(
    settings: Settings, run_id: str, metrics: dict[str, float], images: dict[str, bytes], artifacts: dict[str, Any]
) -> None:
    """Add evaluation metrics, plots (PNG) and JSON artifacts to an existing run."""
    mlc = client(settings)
    for key, value in metrics.items():
        mlc.log_metric(run_id, key, float(value))
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in images.items():
            (Path(tmp) / name).write_bytes(data)
        for name, obj in artifacts.items():
            (Path(tmp) / name).write_text(json.dumps(obj, indent=2))
        mlc.log_artifacts(run_id, tmp, artifact_path="evaluation")


def register(
    settings: Settings, run_id: str, model_uri: str, lineage: dict[str, Any], timeout: float = 300.0
) -> ModelVersion:
    """Register ``model_uri`` as a version of ``settings.model_name`` with lineage tags; idempotent.

    A version that exists for the same commit and data hash is returned unchanged.  A version
    that never becomes READY is deleted, so the registry never keeps a half-registered one.
    """
    existing = find_version(settings, lineage["commit_sha"], lineage.get("data_hash"))
    if existing is not None:
        log.info("model version %s already registered for commit %s", existing.version, lineage["commit_sha"])
        return existing
    mlc = client(settings)
    try:
        mlc.get_registered_model(settings.model_name)
    except MlflowException:
        try:
            mlc.create_registered_model(
                settings.model_name, description="Registered by gitops-ml, one version per commit."
            )
        except MlflowException:
            pass  # created meanwhile
    # A logged model (``models:/m-...``) is named by its id too: a tracking server refuses the source without it.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    created = mlc.create_model_version(
        settings.model_name,
        source=model_uri,
        run_id=run_id,
        tags=lineage_tags(lineage),
        model_id=model_id,
        description=f"commit {lineage['commit_sha']}",
    )
    version, _ = poll(
        lambda: mlc.get_model_version(settings.model_name, created.version),
        lambda found: found.status != "PENDING_REGISTRATION",
        timeout,
        0.5,
    )
    if version.status != "READY":
        mlc.delete_model_version(settings.model_name, version.version)
        raise RegistryError(f"model version for commit {lineage['commit_sha']} ended {version.status}; deleted")
    return _model_version(version)


def get_alias(settings: Settings, alias: str = CHAMPION) -> ModelVersion | None:
    """The version ``alias`` names, or ``None``."""
    try:
        return _model_version(client(settings).get_model_version_by_alias(settings.model_name, alias))
    except MlflowException:
        return None


def set_alias(settings: Settings, version: str | None, alias: str = CHAMPION) -> None:
    """Point ``alias`` at ``version``; ``None`` removes the alias."""
    mlc = client(settings)
    if version is None:
        try:
            mlc.delete_registered_model_alias(settings.model_name, alias)
        except MlflowException:
            pass
    else:
        mlc.set_registered_model_alias(settings.model_name, alias, str(version))


def get_version(settings: Settings, version: str) -> ModelVersion:
    try:
        return _model_version(client(settings).get_model_version(settings.model_name, str(version)))
    except MlflowException as exc:
        raise RegistryError(f"model version {version} of {settings.model_name} not found: {exc.message}") from None


def set_version_tags(settings: Settings, version: str, tags: dict[str, Any]) -> None:
    mlc = client(settings)
    for key, value in lineage_tags(tags).items():
        mlc.set_model_version_tag(settings.model_name, str(version), key, value)


def version_tags(version: ModelVersion) -> dict[str, str]:
    """The ``gitops_ml.*`` tags of a version without their prefix."""
    return {k.removeprefix(TAG_PREFIX): v for k, v in version.tags.items() if k.startswith(TAG_PREFIX)}


def load_model(settings: Settings, version: ModelVersion):
    """Load the Keras model and its metadata (class names, image size) of a registered version."""
    client(settings)
    model = mlflow.keras.load_model(f"models:/{settings.model_name}/{version.version}")
    meta = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{META_ARTIFACT}")
    return model, meta


def load_predictor(settings: Settings, run_id: str, model_uri: str):
    """The traced predict function of a logged model: its code-free serving artifact (no model code is
    imported), or, for a version logged before artifacts existed, the Keras model compiled in place."""
    from gitops_ml import training  # noqa: PLC0415 - TensorFlow only where a model is loaded

    mlc = client(settings)
    if any(a.path == SERVING_ARTIFACT for a in mlc.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SERVING_ARTIFACT, dst_path=tmp)
            return training.load_serving(local)
    return training.compile_predictor(mlflow.keras.load_model(model_uri))


def run_url(ui_url: str, experiment: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def load_logged_model(settings: Settings, model_uri: str):
    """Load a logged (not necessarily registered) Keras model by URI (``models:/m-...`` or ``runs:/...``)."""
    client(settings)
    return mlflow.keras.load_model(model_uri)


def get_run(settings: Settings, run_id: str) -> TrainingRun:
    """The MLflow run ``run_id`` (``RegistryError`` when it does not exist)."""
    try:
        return _training_run(client(settings).get_run(run_id))
    except MlflowException as exc:
        raise RegistryError(f"MLflow run {run_id} not found: {exc.message}") from None


def find_training_run(settings: Settings, airflow_run_id: str) -> TrainingRun | None:
    """The MLflow training run started by an Airflow run, or ``None``.

    The run id comes from a URL: it is checked against Airflow's run-id charset (the default
    ``allowed_run_id_pattern``, at most 250 characters: no quote, backquote, backslash or space)
    before it is compared, by exact equality, with one tag; anything else raises ``InputError``
    without a query, so the lookup can never be an oracle over other tags or params.
    """
    import re  # noqa: PLC0415

    from gitops_ml.errors import InputError  # noqa: PLC0415

    if not isinstance(airflow_run_id, str) or not re.fullmatch(r"[A-Za-z0-9_.~:+-]{1,250}", airflow_run_id):
        raise InputError(
            f"invalid Airflow run id {str(airflow_run_id)[:80]!r}: expected 1 to 250 letters, "
            "digits or any of _ . ~ : + -"
        )
    mlc = client(settings)
    experiment = mlc.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return None
    runs = mlc.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}airflow_run_id` = '{airflow_run_id}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    found = _training_run(runs[0]) if runs else None
    if found is not None and found.tags.get(f"{TAG_PREFIX}airflow_run_id") != airflow_run_id:
        return None  # belt and braces: only an exact match is ever returned
    return found


def load_run_json(settings: Settings, run_id: str, path: str) -> Any:
    """A JSON artifact of a run, or ``None`` when it is missing."""
    client(settings)
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError, ValueError):
        return None


def serving_commit(settings: Settings) -> str | None:
    """The commit the champion is served for: the desired revision of the branch, which may be newer
    than the commit the version was built from (a revert or a no-change commit reuses an older
    version).  Kept on the version itself (``served_for_commit``), so a rollback to a version
    brings back the revision it was serving for."""
    current = get_alias(settings)
    return served_for(current) if current is not None else None


def served_for(version: ModelVersion) -> str | None:
    """The revision ``version`` serves for: set by the deploy step, else the commit it was built from."""
    tags = version_tags(version)
    return tags.get("served_for_commit") or tags.get("commit_sha") or None


def _summary(version: ModelVersion, experiment: str | None) -> dict[str, Any]:
    """A model version as plain values (what the GitOps page shows)."""
    created_at = round(version.created.timestamp() * 1000) if version.created else None  # ms, as MLflow
    return {
        "version": version.version,
        "run_id": version.run_id,
        "experiment_id": experiment,
        "status": version.status,
        "created_at": created_at,
        "tags": version_tags(version),
        "aliases": list(version.aliases),
    }


def champion_summary(settings: Settings) -> dict[str, Any] | None:
    """The champion version as plain values, or ``None`` when nothing was promoted yet."""
    current = get_alias(settings)
    if current is None:
        return None
    return _summary(current, _experiment_or_none(settings))


def version_summaries(settings: Settings, numbers: set[str]) -> dict[str, dict[str, Any]]:
    """The versions ``numbers`` of the model as plain values, in one registry query (a version range)."""
    wanted = {str(n) for n in numbers if str(n).isdigit()}
    if not wanted:
        return {}
    query = (
        f"name = '{settings.model_name}' and version_number >= {min(map(int, wanted))} "
        f"and version_number <= {max(map(int, wanted))}"
    )
    try:
        found = client(settings).search_model_versions(query, max_results=10000)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc):
            return {}
        raise
    experiment = _experiment_or_none(settings)
    return {v.version: _summary(v, experiment) for v in map(_model_version, found) if v.version in wanted}


def _experiment_or_none(settings: Settings) -> str | None:
    experiment = client(settings).get_experiment_by_name(settings.experiment_name)
    return experiment.experiment_id if experiment is not None else None
