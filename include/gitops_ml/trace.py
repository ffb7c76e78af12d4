"""``gitops-ml trace SHA|VERSION``: the chain from a commit to what is serving now.

commit -> Airflow run(s) -> MLflow run and model version -> data hash -> deploy events
-> what the server serves.  Each link comes from the store that owns it (Git, the run
records, MLflow, the server); a store that cannot be reached is reported as such.
"""

from __future__ import annotations

from typing import Any

from gitops_ml import records, source
from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError


def trace(settings: Settings, ref: str) -> dict[str, Any]:
    from gitops_ml import registry  # noqa: PLC0415

    version = None
    if ref.isdigit() and len(ref) < 7:
        version = registry.get_version(settings, ref)
        commit_sha = registry.version_tags(version).get("commit_sha")
        if not commit_sha:
            raise GitopsMLError(f"model version {ref} of {settings.model_name} has no gitops_ml.commit_sha tag")
    else:
        commit_sha = source.validate_sha(ref)
    commit = source.resolve_commit(settings.repo_url, settings.branch, commit_sha, settings.git_cache_dir)
    docs = sorted(
        records.read(records.path_for(settings.records_dir, commit.commit_sha)), key=lambda d: d["@timestamp"]
    )
    built = registry.find_version(settings, commit.commit_sha)
    used_versions = {str(d.get("model_version")) for d in docs if d.get("model_version")}
    versions = []
    for number in sorted(
        {*used_versions, *([built.version] if built else []), *([version.version] if version else [])}, key=int
    ):
        v = registry.get_version(settings, number)
        tags = registry.version_tags(v)
        run = registry.get_run(settings, v.run_id) if v.run_id else None
        versions.append(
            {
                "model_version": number,
                "built_from_commit": tags.get("commit_sha"),
                "mlflow_run_id": v.run_id,
                "data_hash": tags.get("data_hash"),
                "inputs_hash": tags.get("inputs_hash"),
                "model_code_hash": tags.get("model_code_hash"),
                "test_accuracy": run.metrics.get("test_accuracy") if run else None,
                "gate": tags.get("gate"),
                "gate_reasons": tags.get("gate_reasons"),
                "deploy_outcome": tags.get("deploy_outcome"),
                "deployed_at": tags.get("deployed_at"),
                "rollback_reason": tags.get("rollback_reason"),
                "airflow_run_id": tags.get("airflow_run_id"),
                "aliases": list(v.aliases),
            }
        )
    airflow_runs = sorted({d["labels"]["run_id"] for d in docs})
    events = [
        {
            "at": d["@timestamp"],
            "run_id": d["labels"]["run_id"],
            "step": d["event"]["action"],
            "outcome": d["event"]["outcome"],
            "model_version": d.get("model_version"),
            "reason": d.get("reason"),
        }
        for d in docs
    ]
    serving: dict[str, Any] | str
    try:
        from gitops_ml.deploy.client import ServingClient  # noqa: PLC0415

        with ServingClient(settings, timeout=3) as client:
            serving = client.version() or "serving nothing yet"
    except Exception as exc:  # noqa: BLE001 - a trace is still useful without the server
        serving = f"unreachable at {settings.serving_url}: {exc.__class__.__name__}"
    return {
        "commit": commit.model_dump(),
        "note": source.read_note(settings.repo_url, commit.commit_sha, settings.git_cache_dir),
        "airflow_runs": airflow_runs,
        "model_versions": versions,
        "deploy_events": events,
        "serving_now": serving,
    }


def render(chain: dict[str, Any]) -> str:
    commit = chain["commit"]
    lines = [
        f"commit     {commit['commit_sha']}  {commit['message'].splitlines()[0] if commit['message'] else ''}",
        f"           {commit['author']}, {commit['committed_at']}, branch {commit['branch']} of {commit['repo_url']}",
    ]
    for run_id in chain["airflow_runs"] or ["(no pipeline run recorded)"]:
        lines.append(f"airflow    {run_id}")
    for v in chain["model_versions"] or []:
        lines.append(
            f"mlflow     version {v['model_version']} (run {v['mlflow_run_id']}) built from "
            f"{v['built_from_commit']}  aliases: {', '.join(v['aliases']) or '-'}"
        )
        lines.append(
            f"           data hash {v['data_hash']}, model code "
            f"{v.get('model_code_hash') or 'built-in'}, test accuracy {v['test_accuracy']}, gate {v['gate']}"
            + (f" ({v['gate_reasons']})" if v["gate_reasons"] else "")
        )
        if v["deploy_outcome"]:
            lines.append(
                f"           deploy: {v['deploy_outcome']}"
                + (f" at {v['deployed_at']}" if v["deployed_at"] else "")
                + (f"; rollback: {v['rollback_reason']}" if v["rollback_reason"] else "")
            )
    if not chain["model_versions"]:
        lines.append("mlflow     (no model version)")
    for e in chain["deploy_events"]:
        extra = f" version {e['model_version']}" if e["model_version"] else ""
        reason = f": {e['reason']}" if e["reason"] else ""
        lines.append(f"event      {e['at']}  {e['step']} {e['outcome']}{extra}{reason}")
    if chain["note"]:
        lines.append("git note   " + chain["note"].strip().replace("\n", "\n           "))
    serving = chain["serving_now"]
    if isinstance(serving, dict):
        lines.append(f"serving    version {serving['model_version']} of commit {serving['commit_sha']}")
    else:
        lines.append(f"serving    {serving}")
    return "\n".join(lines)
