"""A task's local log file (Airflow's JSON lines) as ECS documents in a real Elasticsearch, and no
shipping (so no waiting) without ``ES_URL``.

The lines below are in the shape Airflow 3.3's task supervisor writes them (``timestamp``,
``level``, ``event``, ``logger``, extra fields, ``error_detail`` for a failure); the live
``airflow standalone`` version of this is ``tests/e2e/test_logs_every_line.py``.
"""

import json
import logging
import time

from gitops_ml import logs
from gitops_ml.airflow.remote_log import file_documents, render_traceback, structured_line

SHA = "f" * 40
LABELS = {
    "commit_sha": SHA,
    "repo_url": "https://git.example.com/org/models.git",
    "branch": "main",
    "dag_id": "gitops_ml_pipeline",
    "run_id": f"commit__{SHA}",
    "task_id": "train",
    "map_index": -1,
    "try_number": 1,
}
log = logging.getLogger("gitops_ml.test")

ERROR_DETAIL = [
    {
        "exc_type": "RuntimeError",
        "exc_value": "training failed",
        "exc_notes": [],
        "syntax_error": None,
        "is_cause": False,
        "frames": [{"filename": "/work/include/gitops_ml/pipeline.py", "lineno": 120, "name": "train"}],
    },
    {
        "exc_type": "ValueError",
        "exc_value": "bad shape",
        "exc_notes": [],
        "syntax_error": None,
        "is_cause": True,
        "frames": [{"filename": "/work/include/gitops_ml/training/model.py", "lineno": 42, "name": "fit_model"}],
    },
]
FILE_LINES = [
    {"timestamp": "2026-11-28T10:00:00.000001Z", "level": "info", "event": "::group::Pre Execute", "logger": "task"},
    {
        "timestamp": "2026-11-28T10:00:00.100000Z",
        "level": "info",
        "event": "epoch 1: loss 0.5",
        "logger": "gitops_ml.training",
        "filename": "model.py",
        "lineno": 10,
    },
    {
        "timestamp": "2026-11-28T10:00:00.200000Z",
        "level": "warning",
        "event": "UserWarning: layer is slow",
        "logger": "py.warnings",
        "category": "UserWarning",
    },
    {
        "timestamp": "2026-11-28T10:00:00.300000Z",
        "level": "info",
        "event": "cloning https://deploy:ghp_FILETOKEN77@git.example.com/m.git",
        "logger": "task.stdout",
    },
    {
        "timestamp": "2026-11-28T10:00:00.400000Z",
        "level": "error",
        "event": "oneDNN custom operations are on",
        "logger": "task.stderr",
    },
    {
        "timestamp": "2026-11-28T10:00:00.500000Z",
        "level": "error",
        "event": "Task failed with exception",
        "logger": "task",
        "error_detail": ERROR_DETAIL,
    },
]


def write_file(path, lines, raw_extra=()):
    path.write_text("\n".join([json.dumps(line) for line in lines] + list(raw_extra)) + "\n")
    return path


def count(client, log_id):
    client.indices.refresh(index=f"{logs.LOGS_INDEX}*")
    return client.count(index=f"{logs.LOGS_INDEX}*", query={"term": {"log_id": log_id}})["count"]


def test_every_file_line_becomes_one_document_exactly_once(es, tmp_path):
    client, _ = es
    path = write_file(tmp_path / "attempt=1.log", FILE_LINES, raw_extra=["not json: a raw line", ""])

    def masker(text):  # stands for Airflow's secrets masker
        return text.replace("oneDNN", "***")

    docs = file_documents(path, LABELS, redactor=masker)
    assert [d["offset"] for d in docs] == list(range(1, 8))  # the empty line is no line
    logs.replace_segment(tmp_path, LABELS, docs)
    assert logs.ship(tmp_path) == {"shipped": 7, "kept": 0, "dropped": 0}
    logs.replace_segment(tmp_path, LABELS, file_documents(path, LABELS, redactor=masker))  # the same file again
    logs.ship(tmp_path)
    log_id = docs[0]["log_id"]
    assert count(client, log_id) == 7
    shipped = logs.search(tmp_path, SHA, task_id="train", client=client)
    assert [d["log"]["logger"] for d in shipped] == [
        "task",
        "gitops_ml.training",
        "py.warnings",
        "task.stdout",
        "task.stderr",
        "task",
        "task",
    ]
    assert shipped[0]["@timestamp"] == "2026-11-28T10:00:00.000001Z"  # as written: the UI orders by it
    assert all(d["labels"]["commit_sha"] == SHA and d["service"]["name"] == "gitops-ml" for d in shipped)
    assert "ghp_FILETOKEN77" not in json.dumps(shipped)
    assert shipped[4]["message"] == "*** custom operations are on"  # Airflow's masker, applied to every line
    failure = shipped[5]
    assert failure["log"]["level"] == "error" and failure["error"]["type"] == "RuntimeError"
    assert failure["message"].startswith("Task failed with exception\nTraceback (most recent call last):")
    assert "fit_model" in failure["error"]["stack_trace"] and "ValueError: bad shape" in failure["message"]
    assert shipped[6]["message"] == "not json: a raw line"
    assert shipped[1]["gitops_ml"]["fields"] == {"filename": "model.py", "lineno": 10}


def test_the_ui_line_of_a_document_is_the_file_line(es, tmp_path):
    client, _ = es
    path = write_file(tmp_path / "attempt=1.log", FILE_LINES)
    logs.replace_segment(tmp_path, LABELS, file_documents(path, LABELS))
    logs.ship(tmp_path)
    shipped = logs.search(tmp_path, SHA, task_id="train", client=client)
    ui = [structured_line(d) for d in shipped]
    assert [line["event"] for line in ui] == [line["event"] for line in FILE_LINES[:3]] + [
        "cloning https://***@git.example.com/m.git",
        FILE_LINES[4]["event"],
        "Task failed with exception",
    ]
    assert ui[5]["error_detail"] == ERROR_DETAIL  # the UI renders the traceback as it does from the file
    assert ui[1]["filename"] == "model.py" and ui[2]["category"] == "UserWarning"


def test_traceback_reads_like_python(tmp_path):
    text = render_traceback(ERROR_DETAIL)
    assert text.index("ValueError: bad shape") < text.index("direct cause") < text.index("RuntimeError: training")
    assert 'File "/work/include/gitops_ml/training/model.py", line 42, in fit_model' in text


def test_the_live_preview_is_superseded_by_the_file(es, tmp_path):
    """Under Airflow's supervisor the task's own lines are only a preview (``.live``, never shipped
    by ``ship``); the file's documents replace it, with the labels the task saved."""
    client, _ = es
    with logs.capture(
        tmp_path, {**LABELS, "commit_sha": "unresolved"}, ship_wait_seconds=7, shipped_by_supervisor=True
    ) as handler:
        handler.labels["commit_sha"] = SHA  # as resolve_commit does once it knows the SHA
        for i in range(10):
            log.info("preview %d", i)
    assert handler.path.suffix == ".live" and logs._segments(tmp_path) == []
    assert logs.ship(tmp_path)["shipped"] == 0  # nothing ships the preview but its live flusher
    supervisor_labels = {k: LABELS[k] for k in ("dag_id", "task_id", "run_id", "map_index", "try_number")}
    labels, wait = logs.saved_labels(tmp_path, supervisor_labels)
    assert labels["commit_sha"] == SHA and labels["branch"] == "main" and wait == 7
    path = write_file(tmp_path / "attempt=1.log", FILE_LINES)
    logs.replace_segment(tmp_path, labels, file_documents(path, labels))
    assert not handler.path.exists() and logs.saved_labels(tmp_path, supervisor_labels) == (supervisor_labels, 0.0)
    assert logs.ship(tmp_path)["shipped"] == len(FILE_LINES)
    docs = logs.search(tmp_path, SHA, task_id="train", client=client)
    assert len(docs) == len(FILE_LINES) and not any(d["message"].startswith("preview") for d in docs)


def test_mapped_task_tries_get_their_own_segments(tmp_path):
    first = logs.replace_segment(tmp_path, {**LABELS, "map_index": 0}, [])
    second = logs.replace_segment(tmp_path, {**LABELS, "map_index": 1}, [])
    unmapped = logs.replace_segment(tmp_path, LABELS, [])
    assert len({first, second, unmapped}) == 3


def test_without_elasticsearch_nothing_ships_and_nothing_waits(tmp_path, monkeypatch):
    monkeypatch.delenv("ES_URL", raising=False)
    started = time.monotonic()
    with logs.capture(tmp_path, LABELS, ship_wait_seconds=60):  # what `record` asks for
        log.info("kept in the spool")
    assert logs.ship_until_delivered(tmp_path, 60) is False
    assert time.monotonic() - started < 2
    assert [d["message"] for d in logs.search(tmp_path, SHA)] == ["kept in the spool"]


def test_our_client_lines_stay_out_of_the_task_log(es, tmp_path):
    """The Elasticsearch client's request lines (``PUT /_bulk [status:200 ...]``) are not task lines."""
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.name)

    collector = Collect(level=logging.INFO)
    logging.getLogger().addHandler(collector)
    try:
        with logs.capture(tmp_path, LABELS):
            log.info("one line")
    finally:
        logging.getLogger().removeHandler(collector)
    assert logs._segments(tmp_path) == []  # it did ship
    assert "gitops_ml.test" in seen and not any(name.startswith("elastic_transport") for name in seen), seen
