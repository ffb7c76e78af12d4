"""The pipeline steps, free of any orchestrator.

Each step takes JSON-able values and returns a small JSON-able dict, so Airflow
passes them through XCom and a test (or ``gitops-ml run --local``) calls them
one after another.  Every step is idempotent for a given commit: running it
twice gives the same result and never a second model version.

    resolve -> prepare -> pull_data -> train -> evaluate -> register -> deploy -> record
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

from gitops_ml import data, params as params_mod, records, source
from gitops_ml.config import Settings

log = logging.getLogger(__name__)


def data_cache_dir(settings: Settings):
    return settings.home / "dvc-cache"


def resolve(settings: Settings, commit_sha: str | None) -> dict[str, Any]:
    """Fetch the tracked branch, check the SHA is on it; report an existing model version for it."""
    from gitops_ml import registry  # noqa: PLC0415

    commit = source.resolve_commit(settings.repo_url, settings.branch, commit_sha, settings.git_cache_dir)
    existing = registry.find_version(settings, commit.commit_sha)
    log.info("commit %s on %s of %s: %s", commit.commit_sha, commit.branch, commit.repo_url,
             f"already registered as version {existing.version}" if existing else "not registered yet")
    return {"commit": commit.to_dict(), "existing_version": str(existing.version) if existing else None}


def prepare(settings: Settings, commit: dict[str, Any]) -> dict[str, Any]:
    """Check the commit out in its own work tree and validate its ``params.yaml``."""
    commit_sha = commit["commit_sha"]
    workdir = source.checkout(settings.repo_url, commit_sha, settings.git_cache_dir, settings.work_dir)
    try:
        params = params_mod.load(workdir)
    except params_mod.ParamsError as exc:
        raise params_mod.ParamsError(f"commit {commit_sha}: {exc}") from None
    return {"workdir": str(workdir), "params": params}


def pull_data(settings: Settings, commit: dict[str, Any], workdir: str, params: dict[str, Any]) -> dict[str, Any]:
    """``dvc pull`` at the commit, verify against the DVC hashes, check the image folder."""
    commit_sha = commit["commit_sha"]
    data_path = params["data"]["path"]
    try:
        snapshot = data.pull(workdir, data_path, data_cache_dir(settings))
        index = data.scan_images(snapshot.path, data_path)
    except data.DataError as exc:
        raise data.DataError(f"commit {commit_sha}: {exc}") from None
    counts = {name: index.labels.count(i) for i, name in enumerate(index.class_names)}
    log.info("commit %s: %d images in %d classes %s, data hash %s", commit_sha, len(index.files),
             len(index.class_names), counts, snapshot.data_hash)
    return {**snapshot.to_dict(), "class_names": index.class_names, "class_counts": counts}


def ensure_workspace(settings: Settings, commit: dict[str, Any], params: dict[str, Any]) -> str:
    """The pulled data folder of ``commit``, recreated if this worker does not have it.

    With several workers (CeleryExecutor) a task may run on another machine than
    ``prepare_workspace`` and ``pull_data``; both steps are idempotent, so they are
    simply repeated here (the Git mirror and the DVC cache make that cheap).
    """
    data_dir = settings.work_dir / commit["commit_sha"] / params["data"]["path"]
    if not data_dir.is_dir():
        log.info("commit %s: work tree not on this worker, checking out and pulling again", commit["commit_sha"])
        source.fetch_mirror(settings.repo_url, commit["branch"], settings.git_cache_dir)
        workdir = source.checkout(settings.repo_url, commit["commit_sha"], settings.git_cache_dir, settings.work_dir)
        data.pull(workdir, params["data"]["path"], data_cache_dir(settings))
    return str(data_dir)


def lineage(commit: dict[str, Any], data_hash: str, dag_id: str | None, run_id: str | None) -> dict[str, Any]:
    return {"commit_sha": commit["commit_sha"], "branch": commit["branch"], "repo_url": commit["repo_url"],
            "data_hash": data_hash, "airflow_dag_id": dag_id, "airflow_run_id": run_id}


def train(settings: Settings, commit: dict[str, Any], workdir: str, params: dict[str, Any],
          pulled: dict[str, Any], run_lineage: dict[str, Any]) -> dict[str, Any]:
    """Train on the pulled data and log the run (params, curves, model) to MLflow."""
    from gitops_ml import registry, training  # noqa: PLC0415

    index = data.scan_images(ensure_workspace(settings, commit, params), params["data"]["path"])
    started = time.monotonic()
    model, history, parts = training.train(index, params)
    seconds = time.monotonic() - started
    h, w, c = training.input_shape(params)
    example = training.load_arrays([index.files[parts.test[0]]], params)
    run_tags = {
        "mlflow.source.git.commit": commit["commit_sha"],
        "mlflow.source.git.branch": commit["branch"],
        "mlflow.source.git.repoURL": commit["repo_url"],
        "mlflow.source.type": "JOB",
        **registry.lineage_tags(run_lineage),
    }
    meta = {"class_names": index.class_names, "height": h, "width": w, "channels": c,
            "n_train": len(parts.train), "n_test": len(parts.test)}
    logged = registry.log_training(settings, f"train-{commit['commit_sha'][:12]}", run_tags,
                                   params_mod.flatten(params), model, history, meta, example)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    registry.log_evaluation(settings, logged["run_id"], {"train_seconds": seconds, "train_peak_rss_mb": peak_rss_mb},
                            {"learning_curves.png": training.learning_curves_png(history, commit["commit_sha"][:12])},
                            {"history.json": history})
    log.info("commit %s: trained %d epochs in %.1f s, final accuracy %.4f, MLflow run %s", commit["commit_sha"],
             len(history.get("loss", [])), seconds, history.get("accuracy", [float("nan")])[-1], logged["run_id"])
    return {**logged, "train_seconds": round(seconds, 3), "train_peak_rss_mb": round(peak_rss_mb, 1),
            "final_train_accuracy": history["accuracy"][-1]}


def evaluate(settings: Settings, commit: dict[str, Any], params: dict[str, Any], pulled: dict[str, Any],
             trained: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the logged model on the held-out split; log metrics and the confusion matrix."""
    from gitops_ml import registry, training  # noqa: PLC0415

    index = data.scan_images(ensure_workspace(settings, commit, params), params["data"]["path"])
    parts = training.split(index, params["train"]["test_fraction"], params["train"]["seed"])
    model = registry.load_logged_model(settings, trained["model_uri"])
    predict = training.compile_predictor(model)
    x = training.load_arrays([index.files[i] for i in parts.test], params)
    y = [index.labels[i] for i in parts.test]
    result = training.evaluate(predict, x, y, index.class_names)
    metrics = {"test_accuracy": result["accuracy"]}
    metrics.update({f"test_recall_{c}": v for c, v in result["recall"].items()})
    metrics.update({f"test_precision_{c}": v for c, v in result["precision"].items()})
    gate = params["gate"]
    reasons = []
    if result["accuracy"] < gate["min_accuracy"]:
        reasons.append(f"test accuracy {result['accuracy']:.4f} < gate.min_accuracy {gate['min_accuracy']}")
    if gate["min_class_recall"] is not None:
        low = {c: r for c, r in result["recall"].items() if r < gate["min_class_recall"]}
        if low:
            reasons.append(f"recall below gate.min_class_recall {gate['min_class_recall']} for {sorted(low)}")
    passed = not reasons
    registry.log_evaluation(
        settings, trained["run_id"], metrics,
        {"confusion_matrix.png": training.confusion_matrix_png(result["confusion_matrix"], index.class_names,
                                                               f"challenger {commit['commit_sha'][:12]}")},
        {"evaluation.json": {k: v for k, v in result.items() if k != "predictions"},
         "smoke_sample.json": {"files": [index.files[i] for i in parts.test[:8]],
                               "predictions": result["predictions"][:8]}},
    )
    log.info("commit %s: test accuracy %.4f on %d images; gate %s%s", commit["commit_sha"], result["accuracy"],
             result["n_test"], "passed" if passed else "failed: ", "; ".join(reasons))
    return {"test_accuracy": result["accuracy"], "n_test": result["n_test"], "gate_passed": passed,
            "gate_reasons": reasons}


def register(settings: Settings, trained: dict[str, Any], evaluated: dict[str, Any],
             run_lineage: dict[str, Any]) -> dict[str, Any]:
    """Register the model version with lineage tags; the same commit never gets a second version."""
    from gitops_ml import registry  # noqa: PLC0415

    tags = {**run_lineage, "test_accuracy": round(evaluated["test_accuracy"], 6),
            "gate": "passed" if evaluated["gate_passed"] else "failed",
            "gate_reasons": "; ".join(evaluated["gate_reasons"]) or None}
    version = registry.register(settings, trained["run_id"], trained["model_uri"], tags)
    log.info("commit %s: model %s version %s", run_lineage["commit_sha"], settings.model_name, version.version)
    return {"model_version": str(version.version), "gate_passed": evaluated["gate_passed"]}


def deploy(settings: Settings, commit: dict[str, Any], model_version: str) -> dict[str, Any]:
    """Make ``model_version`` the champion and confirm the server reports the commit."""
    from gitops_ml import deploy as deploy_mod, registry  # noqa: PLC0415

    result = deploy_mod.deploy(settings, model_version, commit["commit_sha"])
    registry.set_version_tags(settings, model_version, {"deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    return {"model_version": str(model_version), **result}


def record(settings: Settings, commit: dict[str, Any], run_id: str, step: str, outcome: str,
           **fields: Any) -> None:
    """Write the structured record of a step outcome (see ``records``)."""
    records.write(settings.records_dir, records.document(commit["commit_sha"], run_id, step, outcome, **fields))


def run_local(settings: Settings, commit_sha: str | None, run_id: str = "local", dag_id: str = "local",
              deploy_model: bool = True) -> dict[str, Any]:
    """Run every step in this process, in order (no Airflow): for the CLI and tests."""
    resolved = resolve(settings, commit_sha)
    commit = resolved["commit"]
    prepared = prepare(settings, commit)
    pulled = pull_data(settings, commit, prepared["workdir"], prepared["params"])
    run_lineage = lineage(commit, pulled["data_hash"], dag_id, run_id)
    result: dict[str, Any] = {"commit": commit, "data_hash": pulled["data_hash"]}
    if resolved["existing_version"]:
        result.update(model_version=resolved["existing_version"], gate_passed=True, reused=True)
    else:
        trained = train(settings, commit, prepared["workdir"], prepared["params"], pulled, run_lineage)
        evaluated = evaluate(settings, commit, prepared["params"], pulled, trained)
        registered = register(settings, trained, evaluated, run_lineage)
        result.update(registered, test_accuracy=evaluated["test_accuracy"], mlflow_run_id=trained["run_id"],
                      reused=False)
    if deploy_model and result["gate_passed"]:
        result["deploy"] = deploy(settings, commit, result["model_version"])
    record(settings, commit, run_id, "pipeline", "success", **{k: v for k, v in result.items() if k != "commit"})
    return result
