"""Airflow's Elasticsearch provider reading our ECS task-log documents back into the UI.

The provider's reader (``ElasticsearchRemoteLogIO`` in apache-airflow-providers-elasticsearch
6.10) finds a try's lines by ``log_id`` and sorts them by ``offset``: our documents carry
both.  It then takes the top-level fields ``event``/``message``/``level``/``logger`` of each
hit; ECS puts ``event`` (``event.dataset``), ``level`` and ``logger`` under objects, so the
stock reader would print ``{'dataset': ...}`` for every line.  This subclass keeps the
provider's query, paging, index patterns and client settings (``[elasticsearch]``,
``[elasticsearch_configs]``) and only maps our ECS fields to Airflow's structured log line.

Upload goes through our shipper (``gitops_ml.logs``: spool, deterministic ids, retries), not
the provider's (random ids, lines dropped silently on any error).  Airflow's task supervisor
writes the task's local log file (JSON lines: the runner's own lines, our loggers, library
loggers and ``py.warnings``, ``task.stdout``/``task.stderr``, the failure with its structured
traceback) and calls :meth:`EcsElasticsearchLogIO.upload` once the task's process has ended:
every line of that file becomes one ECS document (offset = its line number, so the id is the
same however often it is shipped), labelled with what the task's ``capture`` saved (commit,
repository, branch) and masked again with Airflow's masker and our URL/token redaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow.providers.elasticsearch.log.es_task_handler import ElasticsearchRemoteLogIO, _render_log_id

# Keys of a line of Airflow's JSON task log that become ECS fields (the others go to ``gitops_ml.fields``)
_LINE_KEYS = {"timestamp", "level", "event", "logger", "error_detail", "exception"}


def render_traceback(error_detail: Any) -> str:
    """Airflow's structured exception (structlog's ``dict_tracebacks``: the raised exception first,
    then its causes) as Python prints it."""
    if not isinstance(error_detail, list):
        return str(error_detail)
    blocks = []
    for position, exc in enumerate(reversed(error_detail)):
        if not isinstance(exc, dict):
            blocks.append(str(exc))
            continue
        lines = ["Traceback (most recent call last):"]
        for frame in exc.get("frames") or []:
            lines.append(f'  File "{frame.get("filename")}", line {frame.get("lineno")}, in {frame.get("name")}')
        value = exc.get("exc_value")
        lines.append(f"{exc.get('exc_type')}: {value}" if value not in (None, "") else str(exc.get("exc_type")))
        lines.extend(str(note) for note in exc.get("exc_notes") or [])
        if position < len(error_detail) - 1:
            lines.append(
                "\nThe above exception was the direct cause of the following exception:\n"
                if exc.get("is_cause")
                else "\nDuring handling of the above exception, another exception occurred:\n"
            )
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _masked(value: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, list):
        return [_masked(v, mask) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v, mask) for k, v in value.items()}
    return value


def line_document(
    labels: dict[str, Any], offset: int, raw: str, redactor: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """One line of Airflow's JSON task log file as our ECS document (a line that is not JSON is kept as text)."""
    from gitops_ml import logs
    from gitops_ml.refs import redact

    def mask(text: str) -> str:
        return redact(redactor(text) if redactor else text)

    try:
        line = json.loads(raw)
    except ValueError:
        line = None
    if not isinstance(line, dict):
        return logs.document(labels, offset, "info", "task", mask(raw))
    message = mask(str(line.get("event", "")))
    detail = line.get("error_detail") or line.get("exception")
    error = None
    if detail:
        trace = mask(render_traceback(detail))
        last = detail[0] if isinstance(detail, list) and detail and isinstance(detail[0], dict) else {}
        error = {"type": last.get("exc_type"), "message": mask(str(last.get("exc_value") or "")), "stack_trace": trace}
        message = f"{message}\n{trace}"
    extra = {}
    fields = {k: v for k, v in line.items() if k not in _LINE_KEYS}
    if fields:
        extra["fields"] = _masked(fields, mask)
    if detail:
        extra["error_detail"] = _masked(detail, mask)
    timestamp = line.get("timestamp") if isinstance(line.get("timestamp"), str) else None
    return logs.document(
        labels,
        offset,
        str(line.get("level") or "info"),
        str(line.get("logger") or "task"),
        message,
        timestamp=timestamp,
        error=error,
        extra=extra or None,
    )


def file_documents(
    path: Path, labels: dict[str, Any], redactor: Callable[[str], str] | None = None
) -> list[dict[str, Any]]:
    """Every non-empty line of a task's local log file, in order, as documents with offsets 1..n."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [
        line_document(labels, offset, raw, redactor)
        for offset, raw in enumerate((raw for raw in text.splitlines() if raw.strip()), start=1)
    ]


def airflow_masker() -> Callable[[str], str] | None:
    """Airflow's secrets masker (connection passwords, sensitive variables) for the lines we ship, from
    a task (``steps``) or from its finished log file (``upload``)."""
    try:
        from airflow.sdk._shared.secrets_masker import redact
    except ImportError:  # moved in another Airflow version: our own URL/token redaction still applies
        return None
    return lambda message: str(redact(message))


def uploads_task_log_file() -> bool:
    """True in a task process whose supervisor will ship the task's log file through
    :class:`EcsElasticsearchLogIO` (a worker with ``remote_logging`` on), False in-process (``dag.test()``)."""
    try:
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms
        from airflow.sdk.log import load_remote_log_handler
    except ImportError:
        return False
    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    if comms is None or isinstance(comms, InProcessSupervisorComms):
        return False
    try:
        return isinstance(load_remote_log_handler(), EcsElasticsearchLogIO)
    except Exception:  # noqa: BLE001 - a broken logging config: the task ships its own lines
        return False


def structured_line(source: dict[str, Any]) -> dict[str, Any]:
    """One ECS document as the fields of Airflow's ``StructuredLogMessage``."""
    ecs_log = source.get("log")
    if not isinstance(ecs_log, dict):
        ecs_log = {}
    ours = source.get("gitops_ml") or {}
    message = source.get("message", "")
    if ours.get("error_detail"):  # the UI renders the structured traceback itself, as from the local file
        message = message.split("\n", 1)[0]
    line = {
        **(ours.get("fields") or {}),
        "timestamp": source.get("@timestamp"),
        "event": message,
        "level": ecs_log.get("level", "info"),
        "logger": ecs_log.get("logger"),
        "error_detail": ours.get("error_detail"),
    }
    if ours.get("truncated"):
        line["truncated"] = True
    return {k: v for k, v in line.items() if v is not None}


class EcsElasticsearchLogIO(ElasticsearchRemoteLogIO):
    """The provider's Elasticsearch log reader over gitops-ml's ECS documents (read only)."""

    def _get_source_includes(self, extra_fields=()) -> list[str]:
        return [
            "@timestamp",
            "message",
            "log.level",
            "log.logger",
            "gitops_ml.truncated",
            "gitops_ml.error_detail",
            "gitops_ml.fields",
            self.offset_field,
            *extra_fields,
        ]

    def upload(self, path, ti=None) -> None:
        """Ship every line of the finished try's local log file (called by Airflow's task supervisor
        after the task's process has exited, so the file is complete). Re-uploading gives the same ids."""
        if ti is None:
            return
        local = Path(path) if Path(path).is_absolute() else self.base_log_folder / path
        if not local.is_file():
            return
        from gitops_ml import logs
        from gitops_ml.config import Settings

        home = Settings.from_env().home
        labels, wait = logs.saved_labels(
            home,
            {
                "dag_id": ti.dag_id,
                "task_id": ti.task_id,
                "run_id": ti.run_id,
                "map_index": ti.map_index,
                "try_number": ti.try_number,
            },
        )
        logs.replace_segment(home, labels, file_documents(local, labels, airflow_masker()))
        logs.ship_until_delivered(home, wait)

    def read(self, _relative_path: str, ti) -> tuple[list[str], list[str]]:
        if ti is None:
            return [], []
        log_id = _render_log_id(self.log_id_template, ti, ti.try_number)
        lines: list[str] = []
        offset = 0
        while True:  # page through the whole try, in offset order
            response = self._es_read(log_id, offset, ti, source_includes=self._get_source_includes())
            hits = list(response.hits) if response is not None else []
            if not hits:
                break
            for hit in hits:
                lines.append(json.dumps(structured_line(hit.to_dict())))
            offset = hits[-1].to_dict()[self.offset_field]
            if len(hits) < self.MAX_LINE_PER_PAGE:
                break
        if not lines:
            return [], [f"*** Log {log_id} not found in Elasticsearch (index {self.index_patterns}) yet."]
        return [f"Elasticsearch {self.index_patterns} (gitops-ml ECS documents)"], lines
