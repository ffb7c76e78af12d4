"""The pipeline steps, free of any orchestrator.

Each step takes the payloads of earlier steps and returns its own (``gitops_ml.payloads``:
small, typed, dumped to JSON for Airflow's XCom).  Every step is idempotent for a given commit: running it
twice gives the same result and never a second model version.  The order of the steps
and the rules between them (skip, reuse, gate, finish, failure record) are in
``gitops_ml.flow``, which the Airflow tasks and ``gitops-ml run --local`` share.

    resolve -> prepare -> pull_data -> train -> evaluate -> register -> deploy -> record
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

from gitops_ml import data, params as params_mod, records, source
from gitops_ml.config import Settings
from gitops_ml.errors import ModelCodeError, SignatureRejected
from gitops_ml.payloads import Commit, Deployed, Evaluated, Prepared, Pulled, Registered, Resolved, Trained

log = logging.getLogger(__name__)


def resolve(settings: Settings, commit_sha: str | None, watch_name: str | None = None) -> Resolved:
    """Fetch the tracked branch, check the SHA is on it, apply the signature policy of its watch;
    report an existing model version for it.

    The signature is checked here, on every trigger path (watcher, webhook, UI, REST, CLI,
    schedule), not only by the watcher: a run conf cannot bring an unsigned commit past an
    ``enforce`` policy.  Raises ``SignatureRejected`` naming the SHA and the reason.
    """
    from gitops_ml import registry, watch

    policy = watch.policy_for(settings.repo_url, settings.branch, watch_name)
    commit = source.resolve_commit(settings.repo_url, settings.branch, commit_sha, settings.git_cache_dir)
    signature_warning = None
    if policy is not None and policy.signatures != "off":
        verdict = watch.signature_verdict(
            policy,
            source.mirror_path(settings.repo_url, settings.git_cache_dir),
            commit.commit_sha,
            settings.git_cache_dir / "gnupg",
        )
        if verdict.action == "reject":
            raise SignatureRejected(
                f"REJECTED commit {commit.commit_sha}: signature policy enforce of watch "
                f"{policy.name!r}: {verdict.message}; nothing was built"
            )
        signature_warning = verdict.message if verdict.action == "warn" else None
    existing = registry.find_version(settings, commit.commit_sha)
    log.info(
        "commit %s on %s of %s: %s",
        commit.commit_sha,
        commit.branch,
        commit.repo_url,
        f"already registered as version {existing.version}" if existing else "not registered yet",
    )
    return Resolved(
        commit=commit, existing_version=str(existing.version) if existing else None, signature_warning=signature_warning
    )


def code_hash() -> str:
    """Hash of the code that turns data into a model: training and preprocessing source, TF/Keras versions."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    for name in ("training.py", "images.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    for package in ("tensorflow-cpu", "keras"):
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except Exception:  # noqa: BLE001 - a GPU install has tensorflow instead of tensorflow-cpu
            digest.update(package.encode())
    return digest.hexdigest()[:16]


def inputs_hash(
    params: dict[str, Any], data_hash: str, model_code_hash: str | None = None, weights_hash: str | None = None
) -> str:
    """Everything a model version depends on: data, params, the commit's model code files and the
    DVC-pinned weights they load, our training code and the TF/Keras versions (not the commit itself)."""
    inputs: dict[str, Any] = {"data_hash": data_hash, "params": params, "code": code_hash()}
    if model_code_hash:
        inputs["model_code_hash"] = model_code_hash
    if weights_hash:
        inputs["weights_hash"] = weights_hash
    canonical = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def locate_model_code(commit: Commit, workdir: str | Path, params: dict[str, Any]):
    """The commit's model code (``model_code.ModelCode``) or ``None``; errors name the SHA."""
    from gitops_ml import model_code

    try:
        return model_code.locate(workdir, params.get("model"))
    except ModelCodeError as exc:
        raise ModelCodeError(f"commit {commit.commit_sha}: {exc}") from None


def weights_path(params: dict[str, Any]) -> str | None:
    """``model.weights``: a DVC-tracked folder of pretrained weights the model code loads (or ``None``)."""
    return (params.get("model") or {}).get("weights") or None


def prepare(settings: Settings, commit: Commit) -> Prepared:
    """Check the commit out in its own work tree, validate ``params.yaml``, look for a reusable version.

    A registered version built from the same data hash, params and model code is reused
    instead of retrained (``git revert`` of a bad commit brings the old model back at once).
    """
    from gitops_ml import registry

    commit_sha = commit.commit_sha
    workdir = work_tree(settings, commit, fresh=True)
    try:
        params = params_mod.load(workdir)
    except params_mod.ParamsError as exc:
        raise params_mod.ParamsError(f"commit {commit_sha}: {exc}") from None
    try:
        _, pointer = data.read_pointer(workdir, params["data"]["path"])
        weights = weights_path(params)
        weights_pointer = data.read_pointer(workdir, weights)[1] if weights else None
    except data.DataError as exc:
        raise data.DataError(f"commit {commit_sha}: {exc}") from None
    code = locate_model_code(commit, workdir, params)
    digest = inputs_hash(
        params,
        pointer["md5"].removesuffix(".dir"),
        code.code_hash if code else None,
        weights_pointer["md5"].removesuffix(".dir") if weights_pointer else None,
    )
    reusable = registry.find_version_by_tag(settings, "inputs_hash", digest)
    if reusable is not None:
        log.info(
            "commit %s has the same data, params and model code as model version %s (commit %s): reusing it",
            commit_sha,
            reusable.version,
            registry.version_tags(reusable).get("commit_sha"),
        )
    return Prepared(
        workdir=str(workdir),
        params=params,
        inputs_hash=digest,
        model_code_hash=code.code_hash if code else None,
        reuse_version=str(reusable.version) if reusable is not None else None,
    )


def pull_data(settings: Settings, commit: Commit, workdir: str, params: dict[str, Any]) -> Pulled:
    """``dvc pull`` at the commit, verify against the DVC hashes, check the image folder."""
    commit_sha = commit.commit_sha
    data_path = params["data"]["path"]
    workdir = str(work_tree(settings, commit))  # ``workdir`` may name another worker's disk
    try:
        snapshot = data.pull(workdir, data_path, settings.dvc_cache_dir)
        index = data.scan_images(snapshot.path, data_path)
        weights_at = weights_path(params)
        weights = data.pull(workdir, weights_at, settings.dvc_cache_dir) if weights_at else None
    except data.DataError as exc:
        raise data.DataError(f"commit {commit_sha}: {exc}") from None
    counts = {name: index.labels.count(i) for i, name in enumerate(index.class_names)}
    log.info(
        "commit %s: %d images in %d classes %s, data hash %s",
        commit_sha,
        len(index.files),
        len(index.class_names),
        counts,
        snapshot.data_hash,
    )
    return Pulled(
        **snapshot.to_dict(),
        class_names=index.class_names,
        class_counts=counts,
        weights_hash=weights.data_hash if weights else None,
    )


def work_tree(settings: Settings, commit: Commit, fresh: bool = False) -> Path:
    """The work tree of ``commit`` on this worker, checked out again if this worker does not have it
    (``fresh``: checked out again in any case, as ``prepare`` does).

    With several workers (CeleryExecutor) a task may run on another machine than ``resolve_commit``
    and ``prepare_workspace``: this worker's Git mirror may lack the commit, and a path handed over in
    XCom names the other machine's disk; so every step fetches into its own mirror and finds its
    work tree under its own ``GITOPS_ML_HOME`` (fetch and checkout are idempotent).
    """
    workdir = settings.work_dir / commit.commit_sha
    if fresh or not (workdir / ".git").exists():
        if not fresh:
            log.info("commit %s: work tree not on this worker, checking it out again", commit.commit_sha)
        source.fetch_mirror(settings.repo_url, commit.branch, settings.git_cache_dir)
        workdir = source.checkout(settings.repo_url, commit.commit_sha, settings.git_cache_dir, settings.work_dir)
    return workdir


def ensure_workspace(settings: Settings, commit: Commit, params: dict[str, Any]) -> str:
    """The pulled data folder of ``commit`` on this worker, checked out and pulled again if missing
    (both idempotent; the Git mirror and the DVC cache make that cheap)."""
    data_dir = settings.work_dir / commit.commit_sha / params["data"]["path"]
    if not data_dir.is_dir():
        log.info("commit %s: data not on this worker, pulling it again", commit.commit_sha)
        workdir = work_tree(settings, commit)
        data.pull(workdir, params["data"]["path"], settings.dvc_cache_dir)
        if weights_at := weights_path(params):
            data.pull(workdir, weights_at, settings.dvc_cache_dir)
    return str(data_dir)


def lineage(
    commit: Commit,
    data_hash: str,
    dag_id: str | None,
    run_id: str | None,
    inputs_digest: str | None = None,
    model_code_hash: str | None = None,
) -> dict[str, Any]:
    """The lineage tags of a run's MLflow run and model version."""
    return {
        "commit_sha": commit.commit_sha,
        "branch": commit.branch,
        "repo_url": commit.repo_url,
        "data_hash": data_hash,
        "airflow_dag_id": dag_id,
        "airflow_run_id": run_id,
        "inputs_hash": inputs_digest,
        "model_code_hash": model_code_hash,
    }


def train(settings: Settings, commit: Commit, params: dict[str, Any], run_lineage: dict[str, Any]) -> Trained:
    """Train on the pulled data (with the commit's model code, if any, imported here only) and log the
    run to MLflow: params, curves, the Keras model, the code-free serving artifact, the model code."""
    import tempfile

    from gitops_ml import registry, training

    index = data.scan_images(ensure_workspace(settings, commit, params), params["data"]["path"])
    code = locate_model_code(commit, settings.work_dir / commit.commit_sha, params)
    started = time.monotonic()
    try:
        model, history, parts = training.train(index, params, code)
    except ModelCodeError as exc:
        raise ModelCodeError(f"commit {commit.commit_sha}: {exc}") from None
    seconds = time.monotonic() - started
    h, w, c = training.input_shape(params)
    example = training.load_arrays([index.files[parts.test[0]]], params)
    run_tags = {
        **registry.git_source_tags(commit.commit_sha, commit.branch, commit.repo_url),
        **registry.lineage_tags(run_lineage),
    }
    meta = {
        "class_names": index.class_names,
        "height": h,
        "width": w,
        "channels": c,
        "n_train": len(parts.train),
        "n_test": len(parts.test),
    }
    with tempfile.TemporaryDirectory(prefix="gitops-ml-serving-") as serving_dir:
        try:
            training.export_serving(
                model,
                Path(serving_dir) / "model",
                training.load_arrays([index.files[i] for i in parts.test[:8]], params),
            )
        except ModelCodeError as exc:
            raise ModelCodeError(f"commit {commit.commit_sha}: {exc}") from None
        logged = registry.log_training(
            settings,
            f"train-{commit.commit_sha[:12]}",
            run_tags,
            params_mod.flatten(params),
            model,
            history,
            {**meta, "model_code_hash": code.code_hash if code else None},
            example,
            serving_dir=str(Path(serving_dir) / "model"),
            code_files={f: str(Path(code.root) / f) for f in code.files} if code else None,
        )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    registry.log_evaluation(
        settings,
        logged["run_id"],
        {"train_seconds": seconds, "train_peak_rss_mb": peak_rss_mb},
        {},
        {"history.json": history},
    )
    log.info(
        "commit %s: trained %d epochs in %.1f s, final accuracy %.4f, MLflow run %s",
        commit.commit_sha,
        len(history.get("loss", [])),
        seconds,
        history.get("accuracy", [float("nan")])[-1],
        logged["run_id"],
    )
    return Trained(
        **logged,
        train_seconds=round(seconds, 3),
        train_peak_rss_mb=round(peak_rss_mb, 1),
        final_train_accuracy=history["accuracy"][-1],
    )


def evaluate(settings: Settings, commit: Commit, params: dict[str, Any], trained: Trained) -> Evaluated:
    """Score challenger and champion on the same held-out images of this commit; apply the gate.

    Logs both models' metrics, confusion matrices and learning curves side by side, and a
    smoke sample (images with the challenger's predictions) that the deploy step replays.
    """
    from gitops_ml import gate, registry, training

    index = data.scan_images(ensure_workspace(settings, commit, params), params["data"]["path"])
    parts = training.split(index, params["train"]["test_fraction"])
    test_files = [index.files[i] for i in parts.test]
    y = [index.labels[i] for i in parts.test]
    challenger = training.evaluate(
        registry.load_predictor(settings, trained.run_id, trained.model_uri),
        training.image_batches(test_files, params),
        y,
        index.class_names,
    )
    champion_version, champion, champion_history, note = None, None, None, None
    current = registry.get_alias(settings)
    if current is not None:
        champion_version = str(current.version)
        meta = registry.load_run_json(settings, current.run_id, registry.META_ARTIFACT)
        if list(meta["class_names"]) != index.class_names:
            note = (
                f"champion version {champion_version} predicts classes {meta['class_names']}, this commit has "
                f"{index.class_names}: compared on absolute thresholds only"
            )
            champion = None
        else:
            shape = {"image": {"height": meta["height"], "width": meta["width"], "channels": meta["channels"]}}
            predict = registry.load_predictor(
                settings, current.run_id, f"models:/{settings.model_name}/{current.version}"
            )
            champion = training.evaluate(predict, training.image_batches(test_files, shape), y, index.class_names)
            champion_history = registry.load_run_json(settings, current.run_id, "evaluation/history.json")
    decision = gate.decide(challenger, champion, params["gate"])
    if note:
        decision["reasons_info"] = [note]
    metrics = {"test_accuracy": challenger["accuracy"], "gate_passed": float(decision["passed"])}
    metrics.update({f"{gate.RECALL_PREFIX}{c}": v for c, v in challenger["recall"].items()})
    metrics.update(gate.recall_metrics(challenger["recall"], params["gate"]))
    metrics.update({f"test_precision_{c}": v for c, v in challenger["precision"].items()})
    if champion is not None:
        metrics.update(
            champion_test_accuracy=champion["accuracy"], accuracy_delta=challenger["accuracy"] - champion["accuracy"]
        )
    short = commit.commit_sha[:12]
    panels = [(f"challenger {short}", challenger["confusion_matrix"])]
    curves = [
        (f"challenger {short}", registry.load_run_json(settings, trained.run_id, "evaluation/history.json") or {})
    ]
    if champion is not None:
        panels.append((f"champion v{champion_version}", champion["confusion_matrix"]))
        if champion_history:
            curves.append((f"champion v{champion_version}", champion_history))
    smoke = {
        "files": [os.path.relpath(f, settings.work_dir / commit.commit_sha) for f in test_files[:16]],
        "images": [base64.b64encode(Path(f).read_bytes()).decode() for f in test_files[:16]],
        "classes": [index.class_names[p] for p in challenger["predictions"][:16]],
    }
    registry.log_evaluation(
        settings,
        trained.run_id,
        metrics,
        {
            "confusion_matrix.png": training.confusion_matrices_png(panels, index.class_names),
            "learning_curves.png": training.learning_curves_png(curves),
        },
        {
            "evaluation.json": {
                "challenger": _without_predictions(challenger),
                "champion": _without_predictions(champion) if champion else None,
                "champion_version": champion_version,
                "gate": decision,
            },
            "smoke_sample.json": smoke,
        },
    )
    log.info(
        "commit %s: test accuracy %.4f on %d images (champion %s: %s); %s",
        commit.commit_sha,
        challenger["accuracy"],
        challenger["n_test"],
        champion_version or "none",
        f"{champion['accuracy']:.4f}" if champion else "n/a",
        gate.summary(decision, champion_version),
    )
    return Evaluated(
        test_accuracy=challenger["accuracy"],
        n_test=challenger["n_test"],
        champion_version=champion_version,
        champion_accuracy=champion["accuracy"] if champion else None,
        gate_passed=decision["passed"],
        gate_reasons=decision["reasons"],
    )


def _without_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "predictions"}


def register(settings: Settings, trained: Trained, evaluated: Evaluated, run_lineage: dict[str, Any]) -> Registered:
    """Register the model version with lineage tags; the same commit never gets a second version."""
    from gitops_ml import gate, registry

    tags = {
        **run_lineage,
        "code_hash": code_hash(),
        "test_accuracy": round(evaluated.test_accuracy, 6),
        "gate": "passed" if evaluated.gate_passed else "failed",
        "gate_reasons": "; ".join(evaluated.gate_reasons) or None,
        "gate_compared_with": evaluated.champion_version,
        **gate.recall_tags(registry.get_run(settings, trained.run_id).metrics),  # the evaluation logged them
    }
    version = registry.register(settings, trained.run_id, trained.model_uri, tags)
    registry.set_alias(settings, str(version.version), registry.CHALLENGER)
    log.info(
        "commit %s: model %s version %s (alias %s)",
        run_lineage["commit_sha"],
        settings.model_name,
        version.version,
        registry.CHALLENGER,
    )
    return Registered(
        model_version=str(version.version), gate_passed=evaluated.gate_passed, gate_reasons=evaluated.gate_reasons
    )


def superseded_by(settings: Settings, commit: Commit) -> str | None:
    """The newer commit of the same branch that is already serving, if any.

    The convergence rule of a branch: runs may finish in any order (bursts, retries, a queue
    that starts the newer run first), but an older commit never deploys over a newer one, so
    once the runs settle the newest commit that passed the gate is the one serving.
    """
    from gitops_ml import registry

    serving = registry.serving_commit(settings)
    if serving and source.newer_on_branch(
        settings.repo_url, commit.branch, settings.git_cache_dir, commit.commit_sha, serving
    ):
        return serving
    return None


def deploy_intent(
    settings: Settings, model_version: str, run_id: str, tags: dict[str, str] | None = None
) -> dict[str, str] | None:
    """Write down, before anything moves, that ``run_id`` is about to promote ``model_version``
    over the current champion; return the intent a crashed earlier run left unfinished, if any.

    The alias move and the servers' switch happen before the outcome tags are written; a run
    killed in between leaves the version serving without ``deploy_outcome``.  The intent tags
    (``deploy_pending``, ``deploy_pending_run``, ``deploy_pending_replaces``) let the next run of the commit finish
    that bookkeeping instead of recording "unchanged".
    """
    from gitops_ml import registry

    if tags is None:
        tags = registry.version_tags(registry.get_version(settings, model_version))
    current = registry.get_alias(settings)
    current_version = str(current.version) if current is not None else None
    if current_version == str(model_version):
        if tags.get("deploy_pending") == "true":
            return {"run_id": tags.get("deploy_pending_run", ""), "replaces": tags.get("deploy_pending_replaces", "")}
        return None
    registry.set_version_tags(
        settings,
        model_version,
        {"deploy_pending": "true", "deploy_pending_run": run_id, "deploy_pending_replaces": current_version or ""},
    )
    return None


def deploy(
    settings: Settings,
    commit: Commit,
    model_version: str,
    params: dict[str, Any],
    run_id: str = "local",
    converge: bool = True,
    manual: dict[str, Any] | None = None,
) -> Deployed:
    """Promote ``model_version`` to champion and converge the server on it (see ``gitops_ml.deploy``).

    Every promotion and rollback is recorded: MLflow version tags, a deploy record against
    the commit, and the Git note on the commit.  A promotion whose bookkeeping a crash cut
    short (see ``deploy_intent``) is completed by the next run.  ``converge=False`` (a person's
    rollback, ``gitops_ml.rollback``) skips the convergence rule; ``manual`` (who, what) goes into
    the deploy record.
    """
    from gitops_ml import deploy as deploy_mod, registry

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    newer = superseded_by(settings, commit) if converge else None
    if newer:
        current = registry.get_alias(settings)
        log.warning(
            "NOT DEPLOYED: commit %s is older than commit %s, which is already serving on branch %s; "
            "model version %s stays registered",
            commit.commit_sha,
            newer,
            commit.branch,
            model_version,
        )
        record(
            settings,
            commit.commit_sha,
            run_id,
            "deploy",
            "superseded",
            model_version=str(model_version),
            superseded_by=newer,
        )
        return Deployed(
            model_version=str(model_version),
            changed=False,
            superseded_by=newer,
            previous_version=str(current.version) if current is not None else None,
        )
    tags = registry.version_tags(registry.get_version(settings, model_version))
    unfinished = deploy_intent(settings, model_version, run_id, tags)
    # The revision this version is about to serve for: servers report it (a reused version serves a newer commit).
    registry.set_version_tags(settings, model_version, {"served_for_commit": commit.commit_sha})
    try:
        result = deploy_mod.deploy(settings, model_version, params.get("deploy"))
    except deploy_mod.DeployError as exc:
        registry.set_version_tags(
            settings,
            model_version,
            {
                "served_for_commit": tags.get("served_for_commit"),
                "deploy_outcome": "rolled_back",
                "rolled_back_at": now,
                "rollback_reason": str(exc)[:4000],
                "deploy_pending": "false",
            },
        )
        record(
            settings,
            commit.commit_sha,
            run_id,
            "deploy",
            "rolled_back",
            model_version=str(model_version),
            reason=str(exc),
        )
        raise
    if unfinished is not None:  # the alias moved in a run that died before it could say so
        log.warning(
            "model version %s was promoted by run %s, which stopped before recording it: recording it now",
            model_version,
            unfinished["run_id"],
        )
        result = {
            **result,
            "changed": True,
            "previous_version": unfinished["replaces"] or None,
            "recovered_from_run": unfinished["run_id"],
        }
    if result["changed"]:
        registry.set_version_tags(
            settings,
            model_version,
            {
                "deploy_outcome": "promoted",
                "deployed_at": now,
                "replaced_version": result["previous_version"],
                "deploy_pending": "false",
            },
        )
        if result["previous_version"]:
            registry.set_version_tags(
                settings, result["previous_version"], {"replaced_by": str(model_version), "replaced_at": now}
            )
    record(
        settings,
        commit.commit_sha,
        run_id,
        "deploy",
        "promoted" if result["changed"] else "unchanged",
        model_version=str(model_version),
        previous_version=result["previous_version"],
        watch=result["watch"],
        recovered_from_run=result.get("recovered_from_run"),
        **({"manual": manual} if manual else {}),
    )
    return Deployed(model_version=str(model_version), **result)


def record(settings: Settings, commit_sha: str, run_id: str, step: str, outcome: str, **fields: Any) -> None:
    """Write the structured record of a step outcome of ``commit_sha`` (see ``records``) and queue it for
    Elasticsearch."""
    from gitops_ml import logs

    doc = records.outcome_record(commit_sha, run_id, step, outcome, **fields)
    records.write(settings.records_dir, doc)
    logs.spool_record(settings.home, doc)


def write_note(settings: Settings, commit_sha: str, outcome: dict[str, Any]) -> None:
    """Write the run's outcome onto the commit as a Git note (``refs/notes/gitops-ml``); never fails the run."""
    try:
        source.write_note(settings.repo_url, commit_sha, settings.git_cache_dir, outcome, push=settings.push_notes)
    except Exception as exc:  # noqa: BLE001 - the outcome is recorded elsewhere too
        log.warning("could not write the Git note on commit %s: %s", commit_sha, source.redact(str(exc)))


def gate_of(settings: Settings, model_version: str) -> tuple[bool, str]:
    """(passed, reasons) recorded on a registered version by ``register``."""
    from gitops_ml import registry

    tags = registry.version_tags(registry.get_version(settings, model_version))
    return tags.get("gate") != "failed", tags.get("gate_reasons", "")


def outcome_of(
    settings: Settings, commit: Commit, run_id: str, model_version: str | None, deployed: Deployed | None, reused: bool
) -> dict[str, Any]:
    """What the Git note and the final record say about one run of one commit, with ``summary``:
    the one sentence a user reads first (also the end of the Airflow run note)."""
    from gitops_ml import registry

    tags = registry.version_tags(registry.get_version(settings, model_version)) if model_version else {}
    superseded = deployed.superseded_by if deployed else None
    serving = deployed is not None and not superseded
    promoted = serving and deployed is not None and deployed.changed
    reused_from = tags.get("commit_sha") if reused and tags.get("commit_sha") != commit.commit_sha else None
    outcome = {
        "gitops_ml_run": run_id,
        "model": f"{settings.model_name} version {model_version}" if model_version else None,
        "reused_from_commit": reused_from,
        "data_hash": tags.get("data_hash"),
        "model_code_hash": tags.get("model_code_hash"),
        "gate": tags.get("gate"),
        "gate_reasons": tags.get("gate_reasons"),
        "test_accuracy": float(tags["test_accuracy"]) if tags.get("test_accuracy") else None,
        "compared_with_champion_version": tags.get("gate_compared_with"),
        "deployed": serving,
        "promoted": promoted,
        "replaced_version": deployed.previous_version if promoted and deployed is not None else None,
        "superseded_by": superseded,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    outcome["summary"] = summary(model_version, outcome)
    return outcome


def summary(model_version: str | None, outcome: dict[str, Any]) -> str:
    """One sentence per outcome: PROMOTED / SERVING / NOT PROMOTED / NOT DEPLOYED, naming version and SHA."""
    built = f" (reused, built from commit {outcome['reused_from_commit']})" if outcome.get("reused_from_commit") else ""
    if outcome.get("superseded_by"):
        return (
            f"NOT DEPLOYED: version {model_version}{built} is older than commit {outcome['superseded_by']}, "
            "which is already serving"
        )
    if outcome.get("gate") == "failed" and not outcome.get("deployed"):
        return f"NOT PROMOTED: version {model_version}{built} failed the gate: {outcome.get('gate_reasons') or '?'}"
    if outcome.get("promoted"):
        replaced = (
            f"replaced version {outcome['replaced_version']}"
            if outcome.get("replaced_version")
            else "is the first model served"
        )
        return f"PROMOTED: version {model_version}{built} {replaced}"
    if outcome.get("deployed"):
        return f"SERVING: version {model_version}{built} (already the champion)"
    return f"NOT DEPLOYED: version {model_version}{built}"


def finish(
    settings: Settings, commit: Commit, run_id: str, model_version: str | None, deployed: Deployed | None, reused: bool
) -> dict[str, Any]:
    """Final record and Git note of a run that did not fail."""
    outcome = outcome_of(settings, commit, run_id, model_version, deployed, reused)
    log.info("commit %s: run %s finished: %s", commit.commit_sha, run_id, outcome["summary"])
    record(
        settings,
        commit.commit_sha,
        run_id,
        "pipeline",
        "success" if outcome["deployed"] else ("superseded" if outcome["superseded_by"] else "not_promoted"),
        **outcome,
    )
    write_note(settings, commit.commit_sha, outcome)
    from gitops_ml import retention

    retention.after_run(settings, commit.commit_sha, failed=False, run_id=run_id)  # never raises: logs a warning
    return outcome
