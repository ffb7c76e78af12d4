"""Airflow's Elasticsearch provider reading our ECS task-log documents back into the UI.

The provider's reader (``ElasticsearchRemoteLogIO`` in apache-airflow-providers-elasticsearch
6.10) finds a try's lines by ``log_id`` and sorts them by ``offset``: our documents carry
both.  It then takes the top-level fields ``event``/``message``/``level``/``logger`` of each
hit; ECS puts ``event`` (``event.dataset``), ``level`` and ``logger`` under objects, so the
stock reader would print ``{'dataset': ...}`` for every line.  This subclass keeps the
provider's query, paging, index patterns and client settings (``[elasticsearch]``,
``[elasticsearch_configs]``) and only maps our ECS fields to Airflow's structured log line.

Upload stays with our shipper (``gitops_ml.logs``: spool, deterministic ids, retries), so
the provider's own upload is disabled: it would index every line a second time with random
ids and drop them silently on any error.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.providers.elasticsearch.log.es_task_handler import ElasticsearchRemoteLogIO, _render_log_id


def structured_line(source: dict[str, Any]) -> dict[str, Any]:
    """One ECS document as the fields of Airflow's ``StructuredLogMessage``."""
    ecs_log = source.get("log") if isinstance(source.get("log"), dict) else {}
    line = {"timestamp": source.get("@timestamp"), "event": source.get("message", ""),
            "level": ecs_log.get("level", "info"), "logger": ecs_log.get("logger")}
    if (source.get("gitops_ml") or {}).get("truncated"):
        line["truncated"] = True
    return {k: v for k, v in line.items() if v is not None}


class EcsElasticsearchLogIO(ElasticsearchRemoteLogIO):
    """The provider's Elasticsearch log reader over gitops-ml's ECS documents (read only)."""

    def _get_source_includes(self, extra_fields=()) -> list[str]:
        return ["@timestamp", "message", "log.level", "log.logger", "gitops_ml.truncated",
                self.offset_field, *extra_fields]

    def upload(self, path, ti=None) -> None:
        """Nothing to do: every line was already shipped by ``gitops_ml.logs`` (exactly once)."""

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
