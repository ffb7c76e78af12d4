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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gitops_ml.source import redact


def document(commit_sha: str, run_id: str, step: str, outcome: str, **fields: Any) -> dict[str, Any]:
    doc_id = hashlib.sha256(f"{run_id}|{step}|{outcome}".encode()).hexdigest()[:32]
    return {
        "_id": doc_id,
        "@timestamp": datetime.now(timezone.utc).isoformat(),
        "event": {"dataset": "gitops_ml.run", "action": step, "outcome": outcome},
        "service": {"name": "gitops-ml"},
        "labels": {"commit_sha": commit_sha, "run_id": run_id, "step": step},
        **{k: json.loads(redact(json.dumps(v))) for k, v in fields.items()},
    }


def write(records_dir: Path, doc: dict[str, Any]) -> Path:
    """Append ``doc`` unless a document with the same ``_id`` is already there."""
    path = Path(records_dir) / f"{doc['labels']['commit_sha']}.jsonl"
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
