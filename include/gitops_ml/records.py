"""Run records: one JSON document per pipeline step outcome, keyed by ``commit_sha``.

Embedded default: JSON lines under ``<home>/records/<commit_sha>.jsonl`` with
ECS field names, so they can be bulk-loaded into Elasticsearch later.  The
document id is deterministic (run id + step + outcome): writing twice never
duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gitops_ml.refs import redact

_FULL_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
UNRESOLVED = "unresolved"

__all__ = ["UNRESOLVED", "outcome_record", "path_for", "read", "write"]


def outcome_record(commit_sha: str, run_id: str, step: str, outcome: str, **fields: Any) -> dict[str, Any]:
    """The record of one step outcome of one run (ECS fields; ``fields`` redacted); its ``_id`` is
    a function of run id, step and outcome only."""
    doc_id = hashlib.sha256(f"{run_id}|{step}|{outcome}".encode()).hexdigest()[:32]
    return {
        "_id": doc_id,
        "@timestamp": datetime.now(UTC).isoformat(),
        "event": {"dataset": "gitops_ml.run", "action": step, "outcome": outcome},
        "service": {"name": "gitops-ml"},
        "labels": {"commit_sha": commit_sha, "run_id": run_id, "step": step},
        **{k: json.loads(redact(json.dumps(v))) for k, v in fields.items()},
    }


def path_for(records_dir: Path, commit_sha: str) -> Path:
    """The records file of a commit.  A value that is not a full lowercase SHA (run conf is
    untrusted: ``../../x`` must not become a path) goes to ``unresolved.jsonl``."""
    name = commit_sha if isinstance(commit_sha, str) and _FULL_SHA_RE.fullmatch(commit_sha) else UNRESOLVED
    return Path(records_dir) / f"{name}.jsonl"


def write(records_dir: Path, doc: dict[str, Any]) -> Path:
    """Append ``doc`` unless a document with the same ``_id`` is already there."""
    path = path_for(records_dir, doc["labels"]["commit_sha"])
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(d["_id"] == doc["_id"] for d in read(path)):
        return path
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
