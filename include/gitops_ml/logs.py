"""Run logs as ECS documents, spooled locally and shipped to Elasticsearch exactly once.

Every log line of a task becomes one document (``@timestamp``, ``log.level``, ``message``,
``log.logger``, ``service.name``, ``event.dataset`` and ``labels.*`` with the commit SHA,
repository, branch, dag, run, task and try), plus the ``log_id``/``offset`` fields that
Airflow's Elasticsearch provider reads.  A document's ``_id`` is derived from run, task,
try and line offset, so shipping the same spool twice never duplicates anything.

Documents are appended to a spool (JSON lines under ``<home>/logs/spool``) first; ``ship``
bulk-loads the spool when Elasticsearch is configured (``ES_URL``) and reachable, and
deletes a segment only once every document of it was accepted.  Without Elasticsearch the
spool *is* the store (``gitops-ml logs`` reads it; ``gitops-ml logs --ship`` loads it later):
nothing tries to ship and nothing waits.

Under Airflow's task supervisor with our remote log IO (``gitops_ml.airflow.remote_log``),
the task's whole local log file (the runner's lines, stdout/stderr, warnings, tracebacks) is
turned into documents after the task ends (:func:`replace_segment`, offset = line number of
the file); the task process then only keeps a live preview (``<segment>.live``) that the
final documents overwrite id for id.
The spool never grows past ``GITOPS_ML_SPOOL_MAX_BYTES``: the oldest segments are dropped
and the number of dropped documents is logged.

The only module that imports ``elasticsearch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gitops_ml.config import Settings
from gitops_ml.refs import redact

log = logging.getLogger(__name__)

LOGS_INDEX = "gitops-ml-logs"
RUNS_INDEX = "gitops-ml-runs"
TEMPLATE_NAME = "gitops-ml-logs"
MAX_MESSAGE_BYTES = 64 * 1024
LABEL_KEYS = ("commit_sha", "repo_url", "branch", "dag_id", "run_id", "task_id", "map_index", "try_number")

TEMPLATE = {
    "index_patterns": [f"{LOGS_INDEX}*", f"{RUNS_INDEX}*"],
    "priority": 200,
    "template": {
        "settings": {"number_of_shards": 1, "number_of_replicas": 0},
        "mappings": {
            "dynamic_templates": [{"labels_as_keyword": {"path_match": "labels.*", "mapping": {"type": "keyword"}}}],
            "properties": {
                "@timestamp": {"type": "date"},
                "message": {"type": "text"},
                "log": {"properties": {"level": {"type": "keyword"}, "logger": {"type": "keyword"}}},
                "service": {"properties": {"name": {"type": "keyword"}}},
                "event": {
                    "properties": {
                        "dataset": {"type": "keyword"},
                        "action": {"type": "keyword"},
                        "outcome": {"type": "keyword"},
                    }
                },
                "labels": {"properties": {k: {"type": "keyword"} for k in LABEL_KEYS}},
                "log_id": {"type": "keyword"},
                "offset": {"type": "long"},
                "gitops_ml": {
                    "properties": {
                        "truncated": {"type": "boolean"},
                        "original_bytes": {"type": "long"},
                        # Airflow's structured traceback and the line's other
                        # fields, kept for the UI's rendering, not indexed
                        "error_detail": {"type": "object", "enabled": False},
                        "fields": {"type": "object", "enabled": False},
                    }
                },
                "error": {
                    "properties": {
                        "type": {"type": "keyword"},
                        "message": {"type": "text"},
                        "stack_trace": {"type": "text"},
                    }
                },
                "test_accuracy": {"type": "float"},
                "model_version": {"type": "keyword"},
                "deployed": {"type": "boolean"},
                "previous_version": {"type": "keyword"},
                "reason": {"type": "text"},
            },
        },
    },
}


def spool_dir(home: Path) -> Path:
    return Path(home) / "logs" / "spool"


def _clean_text(value: Any) -> tuple[str, bool, int]:
    """Text safe to ship: valid UTF-8, credentials masked, at most ``MAX_MESSAGE_BYTES``."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    raw = str(value).encode("utf-8", errors="replace")
    truncated = len(raw) > MAX_MESSAGE_BYTES
    text = raw[:MAX_MESSAGE_BYTES].decode("utf-8", errors="ignore") if truncated else raw.decode("utf-8")
    text = redact(text) + (" [truncated]" if truncated else "")
    return text, truncated, len(raw)


def segment_name(labels: dict[str, Any]) -> str:
    """File name stem of a task try's spool segment: run, task, map index (mapped tasks), try."""
    parts = [labels.get("run_id", "-"), labels.get("task_id", "-")]
    if str(labels.get("map_index", "-1")) not in ("-1", "None"):
        parts.append(f"map{labels['map_index']}")
    parts.append(labels.get("try_number", "-"))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in "__".join(str(p) for p in parts))


def document(
    labels: dict[str, Any],
    offset: int,
    level: str,
    logger: str,
    message: Any,
    created: float | None = None,
    timestamp: str | None = None,
    error: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ECS log document; ``_id`` is a function of run, task, try and offset only.

    ``timestamp`` (ISO 8601, kept as written) wins over ``created`` (epoch seconds); ``error`` is
    ECS ``error.*`` (``type``, ``message``, ``stack_trace``); ``extra`` goes under ``gitops_ml``."""
    labels = {k: str(v) for k, v in labels.items() if v is not None}
    text, truncated, size = _clean_text(message)
    # The provider's default ``log_id_template``: {dag_id}-{task_id}-{run_id}-{map_index}-{try_number}
    log_id = (
        f"{labels.get('dag_id', '-')}-{labels.get('task_id', '-')}-{labels.get('run_id', '-')}-"
        f"{labels.get('map_index', '-1')}-{labels.get('try_number', '1')}"
    )
    doc_id = hashlib.sha256(f"{log_id}|{offset}".encode()).hexdigest()[:40]
    doc: dict[str, Any] = {
        "_id": doc_id,
        "@timestamp": timestamp
        or (datetime.fromtimestamp(created, UTC).isoformat() if created else datetime.now(UTC).isoformat()),
        "log": {"level": level.lower(), "logger": logger},
        "message": text,
        "service": {"name": "gitops-ml"},
        "event": {"dataset": "gitops_ml.task"},
        "labels": {k: redact(v) for k, v in labels.items()},
        "log_id": log_id,
        "offset": offset,
    }
    if truncated:
        doc["gitops_ml"] = {"truncated": True, "original_bytes": size}
    if error:
        doc["error"] = {k: _clean_text(v)[0] for k, v in error.items() if v}
    if extra:
        doc.setdefault("gitops_ml", {}).update(extra)
    return doc


class SpoolHandler(logging.Handler):
    """Appends every record as an ECS document to this task try's spool segment (fsync'd per line)."""

    def __init__(
        self, home: Path, labels: dict[str, Any], redactor: Callable[[str], str] | None = None, suffix: str = ".jsonl"
    ):
        super().__init__(level=logging.INFO)
        self.labels = dict(labels)
        self.redactor = redactor  # e.g. Airflow's secrets masker: connection passwords, masked variables
        self.offset = 0
        self._lock_io = threading.Lock()
        self.path = spool_dir(home) / f"{segment_name(labels)}{suffix}"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("elastic_transport", "elasticsearch", "urllib3")):
            return  # our own shipping must not log into what it ships
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            if self.redactor is not None:
                message = self.redactor(message)
            with self._lock_io:
                self.offset += 1
                doc = document(self.labels, self.offset, record.levelname, record.name, message, record.created)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(doc) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        except Exception:  # noqa: BLE001 - logging must never break the task
            self.handleError(record)


def shipping_configured() -> bool:
    """Whether log shipping has anywhere to go: ``ES_URL`` is set."""
    return bool(Settings.from_env().es_url)


@contextmanager
def capture(
    home: Path,
    labels: dict[str, Any],
    ship_after: bool = True,
    ship_wait_seconds: float = 0.0,
    redactor: Callable[[str], str] | None = None,
    shipped_by_supervisor: bool = False,
) -> Iterator[SpoolHandler]:
    """Spool every log line of the block with ``labels``; ship the spool afterwards (best effort,
    retrying for up to ``ship_wait_seconds`` while Elasticsearch is unreachable).

    Without ``ES_URL`` nothing ships and nothing waits: the spool keeps the lines.
    ``shipped_by_supervisor``: Airflow's task supervisor turns the task's whole log file into
    this try's documents after the task (``replace_segment``); the block's own lines are then
    only a live preview (``<segment>.live``, never shipped by :func:`ship`), and the labels and
    the wait are saved for the supervisor (:func:`saved_labels`)."""
    handler = SpoolHandler(home, labels, redactor, suffix=".live" if shipped_by_supervisor else ".jsonl")
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)  # every INFO line of the run is shipped, whatever the host configured
    # The client's request lines (``PUT /_bulk [status:200 ...]``) are our plumbing, not the task's.
    transport = logging.getLogger("elastic_transport")
    transport_level = transport.level
    transport.setLevel(logging.WARNING)
    ship = ship_after and shipping_configured()
    flusher = LiveFlusher(handler.path) if ship or (shipped_by_supervisor and shipping_configured()) else None
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if flusher:
            flusher.stop()
        if shipped_by_supervisor:
            _save_labels(home, handler.labels, ship_wait_seconds)
        elif ship:
            ship_until_delivered(home, ship_wait_seconds)
        transport.setLevel(transport_level)


def _labels_path(home: Path, labels: dict[str, Any]) -> Path:
    return spool_dir(home) / f"{segment_name(labels)}.labels.json"


def _save_labels(home: Path, labels: dict[str, Any], ship_wait_seconds: float) -> None:
    path = _labels_path(home, labels)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(
            {"labels": {k: v for k, v in labels.items() if v is not None}, "ship_wait_seconds": ship_wait_seconds}
        ),
        encoding="utf-8",
    )
    os.replace(tmp, path)


def saved_labels(home: Path, labels: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The labels (commit, repository, branch) and the shipping wait a task try's ``capture`` saved
    for its supervisor, over ``labels``; ``(labels, 0.0)`` for a task that did not go through it."""
    try:
        saved = json.loads(_labels_path(home, labels).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(labels), 0.0
    return {**labels, **saved.get("labels", {})}, float(saved.get("ship_wait_seconds", 0.0))


def replace_segment(home: Path, labels: dict[str, Any], docs: list[dict[str, Any]]) -> Path:
    """Make ``docs`` the whole spool segment of a task try (atomically), superseding its live
    preview and the labels saved for it; ship with :func:`ship` afterwards."""
    folder = spool_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{segment_name(labels)}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    path.with_suffix(".live").unlink(missing_ok=True)
    _labels_path(home, labels).unlink(missing_ok=True)
    return path


class LiveFlusher(threading.Thread):
    """While a task runs, index its new spool lines every ``GITOPS_ML_LOG_FLUSH_SECONDS`` (default 1).

    Only a preview for people watching a running task: it never deletes anything, so the
    shipment at the end of the task (same deterministic ids) stays the one that guarantees
    delivery. Errors are ignored; the spool keeps every line.
    """

    def __init__(self, path: Path):
        super().__init__(name="gitops-ml-log-flush", daemon=True)
        self.path = path
        self.interval = Settings.from_env().log_flush_seconds
        self.position = 0
        self._stopped = threading.Event()
        self.client = es_client() if self.interval > 0 else None
        if self.client is not None:
            self.start()

    def run(self) -> None:
        from elasticsearch import helpers  # noqa: PLC0415

        client = self.client
        if client is None:  # started only with a client
            return
        template_ready = False
        while not self._stopped.wait(self.interval):
            try:
                with open(self.path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(self.position)
                    chunk = fh.read()
                complete = chunk[: chunk.rfind("\n") + 1]  # never a half-written line
                docs = [json.loads(line) for line in complete.splitlines() if line.strip()]
                if docs and not template_ready:
                    install_template(client)  # before the first document creates the index
                    template_ready = True
                if docs:
                    helpers.bulk(
                        client,
                        (
                            {
                                "_index": LOGS_INDEX,
                                "_id": d["_id"],
                                "_source": {k: v for k, v in d.items() if k != "_id"},
                            }
                            for d in docs
                        ),
                        raise_on_error=False,
                        raise_on_exception=False,
                    )
                self.position += len(complete.encode("utf-8"))
            except (OSError, ValueError):
                continue  # nothing spooled yet, or a line being written: next round
            except Exception:  # noqa: BLE001 - a preview only; the end-of-task shipment delivers
                continue

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=10)
        if self.client is not None:
            self.client.close()


def ship_until_delivered(home: Path, wait_seconds: float = 0.0) -> bool:
    """Ship the spool, retrying with backoff for up to ``wait_seconds``; never raises.

    What is still undelivered at the end stays in the spool for the next shipment.
    """
    if not shipping_configured():
        return False  # nowhere to ship: the spool is the store, and nobody waits for it
    deadline = time.monotonic() + wait_seconds
    delay = 0.5
    while True:
        try:
            result = ship(home)
            if not result["kept"]:
                return True
            problem = f"{result['kept']} documents refused"
        except Exception as exc:  # noqa: BLE001 - documents stay in the spool for the next ship
            problem = str(exc)
        if time.monotonic() + delay > deadline:
            log.warning("log shipping deferred, documents kept in the spool: %s", problem)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def spool_record(home: Path, doc: dict[str, Any]) -> None:
    """Queue one structured run record (see ``records``) for the ``gitops-ml-runs`` index."""
    folder = spool_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in doc["labels"]["run_id"])
    with open(folder / f"runs__{safe}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**doc, "_index": RUNS_INDEX}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def es_credentials(settings: Settings) -> dict[str, Any]:
    """Client options for ``ES_URL``: ``api_key`` (``ES_API_KEY``), or ``basic_auth`` as a (user, password)
    pair (``ES_USERNAME``/``ES_PASSWORD``); ``ca_certs`` (``ES_CA_CERTS``).  The one mapping, also used
    for the Airflow UI's log reader (``stack.remote_logging_env``)."""
    options: dict[str, Any] = {}
    if settings.es_api_key:
        options["api_key"] = settings.es_api_key.get_secret_value()
    elif settings.es_username:
        options["basic_auth"] = (settings.es_username, settings.es_password.get_secret_value())
    if settings.es_ca_certs:
        options["ca_certs"] = settings.es_ca_certs
    return options


def es_client(url: str | None = None):
    """Client for ``ES_URL`` with the credentials of :func:`es_credentials`."""
    settings = Settings.from_env()
    url = url or settings.es_url
    if not url:
        return None
    from elasticsearch import Elasticsearch  # noqa: PLC0415

    return Elasticsearch(url, request_timeout=10, max_retries=0, retry_on_timeout=False, **es_credentials(settings))


def install_template(client) -> None:
    """Create or update the index template (idempotent: the same body every time)."""
    client.indices.put_index_template(
        name=TEMPLATE_NAME,
        index_patterns=TEMPLATE["index_patterns"],
        priority=TEMPLATE["priority"],
        template=TEMPLATE["template"],
    )


def _segments(home: Path) -> list[Path]:
    folder = spool_dir(home)
    if not folder.is_dir():
        return []
    dated = []
    for path in folder.glob("*.jsonl"):
        try:
            dated.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue  # shipped and removed meanwhile by another task's shipment
    return [path for _, path in sorted(dated)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def enforce_cap(home: Path, max_bytes: int | None = None) -> int:
    """Drop the oldest spool segments past ``max_bytes``; return how many documents were dropped."""
    max_bytes = max_bytes or Settings.from_env().spool_max_bytes
    segments = _segments(home)
    total = sum(_size(p) for p in segments)
    dropped = 0
    while segments and total > max_bytes:
        oldest = segments.pop(0)
        total -= _size(oldest)
        dropped += len(read_segment(oldest))
        oldest.unlink(missing_ok=True)
    if dropped:
        log.warning("log spool over %d bytes: dropped the %d oldest documents", max_bytes, dropped)
    return dropped


def read_segment(path: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return docs  # shipped and removed meanwhile by another task's shipment
    for line in text.splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write: the rest of the segment still ships
    return docs


def ship(home: Path, client=None) -> dict[str, int]:
    """Bulk-load the spool into Elasticsearch; delete each fully accepted segment. No ES: no-op."""
    from elasticsearch import helpers  # noqa: PLC0415

    client = client or es_client()
    dropped = enforce_cap(home)
    if client is None:
        return {"shipped": 0, "kept": sum(len(read_segment(p)) for p in _segments(home)), "dropped": dropped}
    install_template(client)
    shipped = kept = 0
    for segment in _segments(home):
        docs = read_segment(segment)
        actions = (
            {
                "_op_type": "index",
                "_index": d.get("_index", LOGS_INDEX),
                "_id": d["_id"],
                "_source": {k: v for k, v in d.items() if k not in ("_id", "_index")},
            }
            for d in docs
        )
        ok, errors = helpers.bulk(client, actions, raise_on_error=False, raise_on_exception=False, chunk_size=2000)
        if errors:  # a list of the refused actions (a count only with stats_only=True)
            assert isinstance(errors, list)
            kept += len(docs)
            log.warning("%d documents of %s were refused; kept for the next ship", len(errors), segment.name)
            continue
        shipped += ok
        segment.unlink(missing_ok=True)  # a concurrent shipment of the same segment may have been first
    client.indices.refresh(index=f"{LOGS_INDEX}*,{RUNS_INDEX}*", ignore_unavailable=True)
    return {"shipped": shipped, "kept": kept, "dropped": dropped}


def search(
    home: Path, commit_sha: str, task_id: str | None = None, level: str | None = None, client=None, size: int = 10_000
) -> list[dict[str, Any]]:
    """A commit's log documents in order, from Elasticsearch or (without it) from the spool."""
    client = client or es_client()
    if client is None:
        docs = [d for p in _segments(home) for d in read_segment(p) if "_index" not in d]
        docs = [
            d
            for d in docs
            if d["labels"].get("commit_sha", "").startswith(commit_sha)
            and (task_id is None or d["labels"].get("task_id") == task_id)
            and (level is None or d["log"]["level"] == level.lower())
        ]
        return sorted(docs, key=lambda d: (d["@timestamp"], d["offset"]))
    field = "labels.commit_sha"
    filters: list[dict] = [{"prefix": {field: commit_sha}} if len(commit_sha) < 40 else {"term": {field: commit_sha}}]
    if task_id:
        filters.append({"term": {"labels.task_id": task_id}})
    if level:
        filters.append({"term": {"log.level": level.lower()}})
    response = client.search(
        index=f"{LOGS_INDEX}*",
        query={"bool": {"filter": filters}},
        size=size,
        sort=[{"@timestamp": "asc"}, {"offset": "asc"}],
        ignore_unavailable=True,
    )
    return [{"_id": hit["_id"], **hit["_source"]} for hit in response["hits"]["hits"]]


def run_records(commit_shas: list[str], client=None, size: int = 10_000) -> dict[str, list[dict[str, Any]]]:
    """The run records of several commits from the ``gitops-ml-runs`` index, in one query
    (``{}`` without ``ES_URL``): what the GitOps page reads when workers write records elsewhere."""
    client = client or es_client()
    if client is None or not commit_shas:
        return {}
    response = client.search(
        index=f"{RUNS_INDEX}*",
        query={"terms": {"labels.commit_sha": list(commit_shas)}},
        size=size,
        ignore_unavailable=True,
    )
    found: dict[str, list[dict[str, Any]]] = {}
    for hit in response["hits"]["hits"]:
        doc = {"_id": hit["_id"], **hit["_source"]}
        found.setdefault(doc["labels"]["commit_sha"], []).append(doc)
    return found
