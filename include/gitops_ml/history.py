"""The GitOps history of each watched repository: every commit the watcher saw, what it became,
what serves its model now (one section per watch, with the watch's model name and servers).

Plain functions over plain values, so the view is testable without Airflow: the caller hands
in the pipeline runs it read from the Airflow metadata DB (see ``gitops_ml.airflow.gitops_view``)
as dicts; this module adds what the other stores know and builds the rows the GitOps page shows:

- the run records (``records/<commit_sha>.jsonl``, and the ``gitops-ml-runs`` index when
  Elasticsearch is configured): the run's final outcome, deploys, manual rollbacks;
- the MLflow registry: the champion alias, each version's tags (``gate``, ``gate_reasons``,
  ``test_accuracy``, ``deploy_outcome``, ``rollback_reason`` ...);
- every serving replica's ``/version`` (the watch's ``serving_url`` or ``GITOPS_ML_SERVING_URL``,
  either may list several);
- Git: whether a commit is still on the branch (a force-push removes it), its message and author.

A run dict holds ``run_id``, ``state``, ``conf``, ``note``, ``start_date``, ``end_date``,
``tasks`` (``task_id`` -> ``{"state", "start_date", "end_date"}``) and ``xcom`` (``task_id`` ->
the task's return value, ``"outcome"`` -> the sentence the run note ends with).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from gitops_ml import records
from gitops_ml.config import Settings
from gitops_ml.errors import InputError
from gitops_ml.refs import redact_url
from gitops_ml.runs import PIPELINE_DAG_ID, RUN_ID_PREFIX

log = logging.getLogger(__name__)

TASK_ORDER = ("resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record")
_RUN_SHA = re.compile(re.escape(RUN_ID_PREFIX) + r"([0-9a-f]{40}|[0-9a-f]{64})(?:__|$)")
_BROWSABLE_HOSTS = ("github.com", "gitlab.com", "bitbucket.org", "codeberg.org")
REPLICA_TIMEOUT = 2.0


def commit_sha_of(run: dict[str, Any]) -> str | None:
    """The commit a pipeline run builds: the resolved commit, else the run conf, else the run id."""
    resolved = (run.get("xcom") or {}).get("resolve_commit") or {}
    sha = (resolved.get("commit") or {}).get("commit_sha") or (run.get("conf") or {}).get("commit_sha")
    if sha:
        return sha
    found = _RUN_SHA.match(run.get("run_id") or "")
    return found.group(1) if found else None


def commit_url(repo_url: str | None, commit_sha: str) -> str | None:
    """The commit's page on its Git host when the URL is browsable (HTTPS on a known host), else ``None``."""
    if not repo_url:
        return None
    url = redact_url(repo_url)
    if url.startswith("git@") and ":" in url:  # git@github.com:org/repo.git
        host, path = url[4:].split(":", 1)
        url = f"https://{host}/{path}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in _BROWSABLE_HOSTS or "@" in parts.netloc:
        return None
    path = parts.path.removesuffix(".git").rstrip("/")
    separator = (
        "/-/commit/"
        if parts.hostname == "gitlab.com"
        else ("/commits/" if parts.hostname == "bitbucket.org" else "/commit/")
    )
    return f"https://{parts.hostname}{path}{separator}{commit_sha}"


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def _final_record(docs: list[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    finals = [d for d in docs if d["labels"].get("run_id") == run_id and d["event"]["action"] == "pipeline"]
    return max(finals, key=lambda d: d["@timestamp"]) if finals else None


def decision_of(run: dict[str, Any], outcome: dict[str, Any] | None, on_branch: bool | None) -> dict[str, str]:
    """What happened to the commit, in the words of the issue: trained / reused version N / NO RETRAIN
    NEEDED / REJECTED signature / superseded by SHA / force-pushed away / running / FAILED."""
    conf = run.get("conf") or {}
    tasks = run.get("tasks") or {}
    sentence = (run.get("xcom") or {}).get("outcome") or ""
    prepared = (run.get("xcom") or {}).get("prepare_workspace") or {}
    if conf.get("decision") == "no_retrain" or sentence.startswith("NO RETRAIN NEEDED"):
        return {"kind": "no_retrain", "text": "NO RETRAIN NEEDED", "detail": conf.get("reason") or sentence}
    if conf.get("decision") == "rejected" or sentence.startswith("REJECTED"):
        return {"kind": "rejected", "text": "REJECTED signature", "detail": conf.get("reason") or sentence}
    if on_branch is False:
        return {"kind": "force_pushed", "text": "force-pushed away", "detail": "no longer on the branch"}
    if outcome and outcome.get("superseded_by"):
        return {
            "kind": "superseded",
            "text": f"superseded by {outcome['superseded_by'][:10]}",
            "detail": outcome.get("summary", ""),
        }
    if run.get("state") in ("running", "queued"):
        current = [
            t
            for t in TASK_ORDER
            if (tasks.get(t) or {}).get("state") in ("running", "queued", "deferred", "up_for_retry")
        ]
        return {"kind": "running", "text": f"running: {current[0]}" if current else run["state"], "detail": ""}
    failed = [t for t in TASK_ORDER if (tasks.get(t) or {}).get("state") in ("failed", "upstream_failed")]
    if run.get("state") == "failed" or sentence.startswith("FAILED"):
        return {"kind": "failed", "text": f"FAILED in step {failed[0]}" if failed else "FAILED", "detail": sentence}
    reused = prepared.get("reuse_version") or (outcome or {}).get("reused_from_commit")
    if (tasks.get("train") or {}).get("state") == "success":
        return {"kind": "trained", "text": "trained", "detail": ""}
    if reused or (tasks.get("train") or {}).get("state") == "skipped":
        version = prepared.get("reuse_version") or _version_number((outcome or {}).get("model"))
        return {"kind": "reused", "text": f"reused version {version}" if version else "reused", "detail": ""}
    return {"kind": "unknown", "text": run.get("state") or "?", "detail": ""}


def _version_number(model: str | None) -> str | None:
    """``"gitops-ml-classifier version 3"`` -> ``"3"``."""
    return model.rsplit(" ", 1)[-1] if model and model.rsplit(" ", 1)[-1].isdigit() else None


def gate_of(run: dict[str, Any], tags: dict[str, str]) -> dict[str, Any] | None:
    """Challenger vs champion accuracy, the rules' verdict and its reasons (from the evaluate step, else the
    version's tags)."""
    evaluated = (run.get("xcom") or {}).get("evaluate") or {}
    if not evaluated and not tags.get("gate"):
        return None
    passed = evaluated.get("gate_passed") if evaluated else tags.get("gate") == "passed"
    reasons = (
        evaluated.get("gate_reasons") if evaluated else [r for r in (tags.get("gate_reasons") or "").split("; ") if r]
    )
    accuracy = (
        evaluated.get("test_accuracy")
        if evaluated
        else (float(tags["test_accuracy"]) if tags.get("test_accuracy") else None)
    )
    return {
        "passed": bool(passed),
        "reasons": list(reasons or []),
        "challenger_accuracy": accuracy,
        "champion_accuracy": evaluated.get("champion_accuracy"),
        "champion_version": evaluated.get("champion_version") or tags.get("gate_compared_with"),
        **recall_of(tags),
    }


def recall_of(tags: dict[str, str]) -> dict[str, Any]:
    """The per-class recall check of a version (the tags ``pipeline.register`` writes): the gate's floor
    (``None`` without one), the worst class and its recall, and whether that class meets the floor."""
    floor = float(tags["min_class_recall"]) if tags.get("min_class_recall") else None
    worst = float(tags["worst_class_recall"]) if tags.get("worst_class_recall") else None
    return {
        "recall_floor": floor,
        "worst_class": tags.get("worst_class"),
        "worst_class_recall": worst,
        "recall_passed": None if floor is None or worst is None else worst >= floor,
    }


def note_lines(xcom: dict[str, Any]) -> list[str]:
    """What the run note says besides the outcome: the decision (trained / reused) and the gate result,
    from the ``prepare_workspace`` and ``evaluate`` return values."""
    lines = []
    reused = (xcom.get("prepare_workspace") or {}).get("reuse_version")
    if reused:
        lines.append(f"decision: reused version {reused} (same data, params and model code), not retrained")
    evaluated = xcom.get("evaluate") or {}
    if evaluated.get("test_accuracy") is not None:
        against = (
            f" against champion version {evaluated['champion_version']}'s {evaluated['champion_accuracy']:.4f}"
            if evaluated.get("champion_accuracy") is not None
            else " (no champion to compare with)"
        )
        verdict = "passed" if evaluated.get("gate_passed") else "FAILED"
        lines.append(f"decision: trained; gate {verdict}: test accuracy {evaluated['test_accuracy']:.4f}{against}")
    return lines


def deploy_of(
    version: dict[str, Any] | None, outcome: dict[str, Any] | None, champion: str | None, manual: dict[str, Any] | None
) -> dict[str, Any] | None:
    """promoted / not promoted / rolled back (and why) / superseded / serving, of the run's model version."""
    tags = (version or {}).get("tags") or {}
    number = (version or {}).get("version")
    serving = number is not None and number == champion
    if manual is not None:
        return {
            "kind": "manual",
            "text": f"{manual['action']} by {manual['by']}",
            "serving": serving,
            "detail": manual.get("reason") or "",
        }
    if tags.get("deploy_outcome") == "rolled_back" or tags.get("rollback_reason"):
        return {
            "kind": "rolled_back",
            "text": "rolled back",
            "serving": serving,
            "detail": tags.get("rollback_reason") or "",
        }
    if outcome and outcome.get("superseded_by"):
        return {
            "kind": "superseded",
            "text": "not deployed (superseded)",
            "serving": serving,
            "detail": outcome.get("summary", ""),
        }
    if outcome and outcome.get("gate") == "failed" and not outcome.get("deployed"):
        return {
            "kind": "not_promoted",
            "text": "NOT PROMOTED",
            "serving": serving,
            "detail": outcome.get("summary", ""),
        }
    if outcome and outcome.get("promoted"):
        replaced = outcome.get("replaced_version")
        return {
            "kind": "promoted",
            "text": "promoted",
            "serving": serving,
            "detail": f"replaced version {replaced}" if replaced else "first model served",
        }
    if outcome and outcome.get("deployed"):
        return {"kind": "serving", "text": "serving (already champion)", "serving": serving, "detail": ""}
    if tags.get("gate") == "failed":
        return {
            "kind": "not_promoted",
            "text": "NOT PROMOTED",
            "serving": serving,
            "detail": tags.get("gate_reasons") or "",
        }
    if tags.get("deploy_outcome") == "promoted":
        return {"kind": "promoted", "text": "promoted", "serving": serving, "detail": ""}
    return None


def last_manual_action(docs: list[dict[str, Any]], model_version: str | None) -> dict[str, Any] | None:
    """The newest manual rollback/promotion (``gitops_ml.rollback``) recorded for ``model_version``."""
    manual = [
        d
        for d in docs
        if d["event"]["action"] == "deploy" and d.get("manual") and str(d.get("model_version")) == str(model_version)
    ]
    if not manual:
        return None
    doc = max(manual, key=lambda d: d["@timestamp"])
    return {
        "action": doc["manual"].get("action", "rolled back"),
        "by": doc["manual"].get("by", "?"),
        "at": doc["@timestamp"],
        "reason": doc.get("reason"),
    }


def links_of(
    settings: Settings,
    run: dict[str, Any],
    commit_sha: str | None,
    repo_url: str | None,
    version: dict[str, Any] | None,
    mlflow_run_id: str | None,
    experiment_id: str | None,
    kibana_url: str | None,
) -> dict[str, str | None]:
    ui = settings.mlflow_ui_url.rstrip("/")
    logs = None
    if commit_sha and kibana_url:
        query = quote(f'labels.commit_sha : "{commit_sha}"')
        logs = (
            f"{kibana_url.rstrip('/')}/app/discover#/view/gitops-ml-log-lines"
            f"?_a=(query:(language:kuery,query:'{query}'))"
        )
    return {
        "airflow_run": f"/dags/{run.get('dag_id') or PIPELINE_DAG_ID}/runs/{quote(run['run_id'], safe='')}",
        "mlflow_run": (
            f"{ui}/#/experiments/{experiment_id}/runs/{mlflow_run_id}" if mlflow_run_id and experiment_id else None
        ),
        "mlflow_version": (
            f"{ui}/#/models/{quote(settings.model_name)}/versions/{version['version']}" if version else None
        ),
        "logs": logs,
        "logs_command": f"gitops-ml logs {commit_sha}" if commit_sha else None,
        "commit": commit_url(repo_url, commit_sha) if commit_sha else None,
    }


def row(
    settings: Settings,
    run: dict[str, Any],
    docs: list[dict[str, Any]],
    versions: dict[str, dict[str, Any]],
    champion: str | None,
    commit_info: dict[str, Any] | None,
    kibana_url: str | None = None,
) -> dict[str, Any]:
    """One history row: the commit, its run (task by task), decision, gate, model version, deploy, links."""
    xcom = run.get("xcom") or {}
    commit_sha = commit_sha_of(run)
    resolved_commit = (xcom.get("resolve_commit") or {}).get("commit") or {}
    info = {**(commit_info or {}), **{k: v for k, v in resolved_commit.items() if v}}
    final = _final_record(docs, run["run_id"])
    outcome = final if final is not None else None
    model_version = (
        (xcom.get("register") or {}).get("model_version")
        or (xcom.get("prepare_workspace") or {}).get("reuse_version")
        or ((xcom.get("resolve_commit") or {}).get("existing_version"))
        or _version_number((outcome or {}).get("model"))
    )
    version = versions.get(str(model_version)) if model_version else None
    tags = (version or {}).get("tags") or {}
    trained = xcom.get("train") or {}
    mlflow_run_id = trained.get("run_id") or (version or {}).get("run_id")
    manual = last_manual_action(docs, model_version)
    tasks = [{"task_id": t, **(run.get("tasks") or {}).get(t, {"state": None})} for t in TASK_ORDER]
    may_roll_back = (
        bool(version)
        and str(model_version) != champion
        and (tags.get("deploy_outcome") == "promoted" or bool(tags.get("deployed_at")))
        and tags.get("gate") != "failed"
    )
    return {
        "commit_sha": commit_sha,
        "short_sha": (commit_sha or "")[:10],
        "message": (info.get("message") or "").splitlines()[0] if info.get("message") else "",
        "author": info.get("author") or "",
        "committed_at": info.get("committed_at"),
        "on_branch": (commit_info or {}).get("on_branch"),
        "run": {
            "run_id": run["run_id"],
            "state": run.get("state"),
            "start_date": run.get("start_date"),
            "end_date": run.get("end_date"),
            "duration_s": _seconds(run.get("start_date"), run.get("end_date")),
            "note": run.get("note") or "",
            "trigger": (run.get("conf") or {}).get("trigger"),
            "tasks": tasks,
        },
        "decision": decision_of(run, outcome, (commit_info or {}).get("on_branch")),
        "gate": gate_of(run, tags),
        "model_version": str(model_version) if model_version else None,
        "data_hash": tags.get("data_hash") or (xcom.get("pull_data") or {}).get("data_hash"),
        "deploy": deploy_of(version, outcome, champion, manual),
        "summary": (outcome or {}).get("summary") or xcom.get("outcome") or "",
        "can_roll_back": may_roll_back,
        "links": links_of(
            settings,
            run,
            commit_sha,
            resolved_commit.get("repo_url") or settings.repo_url,
            version,
            mlflow_run_id,
            trained.get("experiment_id") or (version or {}).get("experiment_id"),
            kibana_url,
        ),
    }


def replica_versions(settings: Settings, timeout: float = REPLICA_TIMEOUT) -> list[dict[str, Any]]:
    """Each serving replica's ``/version`` (concurrently, short timeout): what it serves, or why not known."""

    def ask(url: str) -> dict[str, Any]:
        try:
            response = httpx.get(url + "/version", timeout=timeout)
        except httpx.HTTPError as exc:
            return {"url": url, "reachable": False, "error": type(exc).__name__}
        if response.status_code == 503:
            return {"url": url, "reachable": True, "serving": None}
        try:
            body = response.json()
        except ValueError:
            return {"url": url, "reachable": True, "error": f"HTTP {response.status_code}"}
        return {"url": url, "reachable": True, "serving": body}

    urls = settings.serving_urls
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(urls)))) as pool:
        return list(pool.map(ask, urls))


def now_serving(
    champion: dict[str, Any] | None, replicas: list[dict[str, Any]], commit_info: dict[str, Any] | None
) -> dict[str, Any]:
    """The champion alias (desired) beside every replica's ``/version`` (observed); a replica that
    disagrees with the alias (other version, other commit, nothing, unreachable) is flagged."""
    tags = (champion or {}).get("tags") or {}
    version = (champion or {}).get("version")
    served_for = tags.get("served_for_commit") or tags.get("commit_sha")
    checked = []
    for replica in replicas:
        serving = replica.get("serving") or {}
        agrees = (
            replica.get("reachable")
            and version is not None
            and str(serving.get("model_version")) == str(version)
            and serving.get("commit_sha") == served_for
        )
        checked.append({**replica, "agrees": bool(agrees) if champion else not serving})
    info = commit_info or {}
    return {
        "model_version": version,
        "commit_sha": served_for,
        "built_from_commit": tags.get("commit_sha"),
        "message": (info.get("message") or "").splitlines()[0] if info.get("message") else "",
        "author": info.get("author") or "",
        "committed_at": info.get("committed_at"),
        "data_hash": tags.get("data_hash"),
        "code_hash": tags.get("model_code_hash") or tags.get("code_hash"),
        "since": tags.get("manual_deploy_at") or tags.get("deployed_at"),
        "test_accuracy": float(tags["test_accuracy"]) if tags.get("test_accuracy") else None,
        "replicas": checked,
        "all_agree": all(r["agrees"] for r in checked),
    }


def section(
    settings: Settings,
    name: str,
    runs: list[dict[str, Any]],
    total: int,
    page: int,
    per_page: int,
    *,
    versions: dict[str, dict[str, Any]],
    champion: dict[str, Any] | None,
    replicas: list[dict[str, Any]],
    commits: dict[str, dict[str, Any]],
    records_of,
    kibana_url: str | None = None,
) -> dict[str, Any]:
    """The section of one watched repository (``settings`` are its run settings: URL, branch, model
    name, servers): what serves its model now, and one page of its runs as history rows.

    ``records_of(commit_sha)`` returns the run records of a commit; ``commits`` maps a SHA to what
    Git says of it (``message``, ``author``, ``committed_at``, ``on_branch``).
    """
    champion_number = str(champion["version"]) if champion else None
    rows = []
    for run in runs:
        commit_sha = commit_sha_of(run)
        docs = records_of(commit_sha) if commit_sha else []
        rows.append(row(settings, run, docs, versions, champion_number, commits.get(commit_sha or ""), kibana_url))
    champion_tags = (champion or {}).get("tags") or {}
    serving = now_serving(
        champion,
        replicas,
        commits.get(champion_tags.get("served_for_commit") or champion_tags.get("commit_sha") or ""),
    )
    return {
        "watch": name,
        "model_name": settings.model_name,
        "repository": redact_url(settings.repo_url) if settings.repo_url else None,
        "branch": settings.branch,
        "now_serving": serving,
        "actions": manual_actions(champion),
        "rows": rows,
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": max(1, -(-total // per_page)),
        "running": any(r.get("state") in ("running", "queued") for r in runs),
    }


def manual_actions(champion: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The manual rollback/promotion that put the champion in place, if that is how it got there."""
    tags = (champion or {}).get("tags") or {}
    if not tags.get("manual_deploy_at"):
        return []
    return [
        {
            "action": tags.get("manual_deploy_action") or "rolled back",
            "by": tags.get("manual_deploy_by") or "?",
            "at": tags["manual_deploy_at"],
            "model_version": str(champion["version"]),  # type: ignore[index]  # tags were found: a champion
            "commit_sha": tags.get("served_for_commit") or tags.get("commit_sha"),
            "replaced_version": tags.get("replaced_version"),
            "reason": tags.get("manual_deploy_reason"),
        }
    ]


def records_reader(settings: Settings, commit_shas: list[str], es_client=None):
    """``records_of(commit_sha)``: the run records under ``<home>/records`` merged (by document id)
    with the run-records index when Elasticsearch is configured (workers on other machines write
    their records there), fetched for all ``commit_shas`` of the page in one query."""
    indexed: dict[str, list[dict[str, Any]]] = {}
    if es_client is not None or settings.es_url:
        from gitops_ml import logs  # noqa: PLC0415 - elasticsearch is heavy

        try:
            indexed = logs.run_records(commit_shas, client=es_client)
        except Exception as exc:  # noqa: BLE001 - the page still shows what the other stores know
            log.warning("run-records index not readable, showing local records only: %s", exc)

    def records_of(commit_sha: str) -> list[dict[str, Any]]:
        local = records.read(records.path_for(settings.records_dir, commit_sha))
        seen = {d["_id"] for d in local}
        return local + [d for d in indexed.get(commit_sha, []) if d["_id"] not in seen]

    return records_of


def watched(name: str | None = None) -> list[tuple[str, Settings]]:
    """Each watched repository's name and run settings (its URL, branch, model name and model servers;
    ``Watch.run_settings``), in the watch file's order; without a watch file the ``default``
    watch of the environment.  ``name`` picks one (``InputError`` naming it when nobody watches it)."""
    from gitops_ml import watch  # noqa: PLC0415 - the watch file is read per request: it may change
    from gitops_ml.runs import DEFAULT_WATCH  # noqa: PLC0415

    found = [(w.name, w.run_settings()) for w in watch.load_watches()] or [(DEFAULT_WATCH, Settings.from_env())]
    if name is None:
        return found
    picked = [(n, s) for n, s in found if n == name]
    if not picked:
        raise InputError(f"no watched repository named {name!r} (watched: {', '.join(n for n, _ in found)})")
    return picked


def warm_up() -> None:
    """Do once what makes the first history request slow: import MLflow (seconds) and Git, and open
    each watched model's registry store (``champion_summary``). Called in the background when the
    API server starts (``gitops_ml.airflow.links``); a failure only means the first request pays."""
    from gitops_ml import registry, source  # noqa: F401, PLC0415 - importing them is the point

    for _, settings in watched():
        registry.champion_summary(settings)


def collect_section(
    settings: Settings,
    name: str,
    runs: list[dict[str, Any]],
    total: int,
    page: int,
    per_page: int,
    kibana_url: str | None = None,
) -> dict[str, Any]:
    """The section of one watched repository from the real stores: its model's registry (champion
    and the page's versions), its replicas, Git (message/author, still on the branch) and the run
    records."""
    from gitops_ml import registry, source  # noqa: PLC0415 - mlflow and git are heavy

    champion = registry.champion_summary(settings)
    wanted = set()
    for run in runs:
        xcom = run.get("xcom") or {}
        for value in (
            (xcom.get("register") or {}).get("model_version"),
            (xcom.get("prepare_workspace") or {}).get("reuse_version"),
            (xcom.get("resolve_commit") or {}).get("existing_version"),
        ):
            if value:
                wanted.add(str(value))
    versions = registry.version_summaries(settings, wanted)
    if champion is not None:
        versions.setdefault(str(champion["version"]), champion)
    shas = {s for s in (commit_sha_of(r) for r in runs) if s}
    if champion is not None:
        shas.add(champion["tags"].get("served_for_commit") or champion["tags"].get("commit_sha") or "")
    commits = (
        source.describe_commits(
            settings.repo_url, settings.branch, settings.git_cache_dir, sorted(s for s in shas if s)
        )
        if settings.repo_url
        else {}
    )
    return section(
        settings,
        name,
        runs,
        total,
        page,
        per_page,
        versions=versions,
        champion=champion,
        replicas=replica_versions(settings),
        commits=commits,
        records_of=records_reader(settings, sorted(s for s in shas if s)),
        kibana_url=kibana_url,
    )
