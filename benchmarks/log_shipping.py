"""Log shipping into a real Elasticsearch: our spool + bulk path against one request per document.

    python -m benchmarks.log_shipping [--docs 100000] [--file-lines 100000]

Starts a single-node Elasticsearch 8.19.21 (``tests.es_node``, Maven Central) on loopback,
spools ``--docs`` ECS documents through ``logs.capture`` and ships them with ``logs.ship``
(the path of a task run in-process, and the live preview), then the path every task on a
worker takes since every line is shipped: a task log file of ``--file-lines`` lines in the
shape Airflow's supervisor writes them (runner lines with their fields, stdout/stderr,
``py.warnings``, a failure with its structured traceback every 1,000 lines) turned into
documents and spooled (``remote_log.file_documents`` + ``logs.replace_segment``, what
``EcsElasticsearchLogIO.upload`` does) and shipped. Then indexes a sample of documents one
request each (``client.index``; the baseline, extrapolated per document) into another index.
Also the end-to-end delay of one log line: ``log.info`` -> searchable, median of 20 at task
end and of 10 while the task still runs (live flusher).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

from benchmarks._common import free_port, fresh_home
from gitops_ml import logs
from tests.es_node import ElasticsearchNode

SHA = "b" * 40
ERROR_DETAIL = [
    {
        "exc_type": "ValueError",
        "exc_value": "bad batch",
        "exc_notes": [],
        "syntax_error": None,
        "is_cause": False,
        "frames": [{"filename": f"/srv/app/module_{i}.py", "lineno": 10 + i, "name": f"step_{i}"} for i in range(12)],
    }
]


def write_task_log(path: Path, lines: int) -> None:
    """A task log file as Airflow 3.3's supervisor writes it: one JSON object per line."""
    ids = {
        "task_id": "train",
        "ti_id": "01a2225f-4224-7919-a990-d2fa910fb5bf",
        "dag_id": "bench",
        "map_index": -1,
        "run_id": "bench",
        "try_number": 1,
    }
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            ts = f"2026-11-28T10:{i // 600000 % 60:02d}:{i // 10000 % 60:02d}.{i % 10000:04d}00Z"
            kind = i % 10
            if i % 1000 == 999:
                line = {
                    "timestamp": ts,
                    "level": "error",
                    "event": "Task failed with exception",
                    "logger": "task",
                    **ids,
                    "error_detail": ERROR_DETAIL,
                }
            elif kind < 5:
                line = {
                    "timestamp": ts,
                    "level": "info",
                    "event": f"training step {i} loss={1.0 / (i + 1):.4f}",
                    "logger": "gitops_ml.training",
                    **ids,
                    "filename": "model.py",
                    "lineno": 88,
                }
            elif kind < 7:
                line = {
                    "timestamp": ts,
                    "level": "info",
                    "event": f"{i}/1875 [=====>....] - loss: 0.31",
                    "logger": "task.stdout",
                }
            elif kind < 8:
                line = {
                    "timestamp": ts,
                    "level": "error",
                    "event": "I tensorflow/core/util/port.cc:153] oneDNN on",
                    "logger": "task.stderr",
                }
            elif kind < 9:
                line = {
                    "timestamp": ts,
                    "level": "warning",
                    "event": "UserWarning: Do not pass an input_shape",
                    "logger": "py.warnings",
                    **ids,
                    "category": "UserWarning",
                    "filename": "layer.py",
                    "lineno": 93,
                }
            else:
                line = {
                    "timestamp": ts,
                    "level": "info",
                    "event": "Task instance state updated",
                    "logger": "task",
                    **ids,
                    "filename": "task_runner.py",
                    "lineno": 1073,
                }
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--file-lines", type=int, default=100_000)
    parser.add_argument("--baseline-docs", type=int, default=5_000)
    args = parser.parse_args()
    home = fresh_home("log-shipping-", free_port())
    node = ElasticsearchNode().start()
    os.environ["ES_URL"] = node.url  # what the tasks' own shipping reads
    client = logs.es_client(node.url)
    log = logging.getLogger("gitops_ml.bench")
    try:
        labels = {"commit_sha": SHA, "dag_id": "bench", "run_id": "bench", "task_id": "bulk", "try_number": 1}
        started = time.perf_counter()
        with logs.capture(home, labels, ship_after=False):
            for i in range(args.docs):
                log.info("training step %d loss=%.4f", i, 1.0 / (i + 1))
        spooled = time.perf_counter() - started
        print(f"spooled {args.docs} documents in {spooled:.1f} s", flush=True)
        started = time.perf_counter()
        result = logs.ship(home, client)
        shipped = time.perf_counter() - started
        assert result["shipped"] == args.docs, result
        client.indices.refresh(index=logs.LOGS_INDEX)
        assert client.count(index=logs.LOGS_INDEX)["count"] == args.docs

        # Imported only now: importing Airflow adds its console handler to the root logger, which
        # would also print every line of the spool step above.
        from gitops_ml.airflow.remote_log import file_documents

        file_labels = {**labels, "task_id": "file"}
        task_log = home / "attempt=1.log"
        write_task_log(task_log, args.file_lines)
        started = time.perf_counter()
        logs.replace_segment(home, file_labels, file_documents(task_log, file_labels))
        converted = time.perf_counter() - started
        started = time.perf_counter()
        result = logs.ship(home, client)
        file_shipped = time.perf_counter() - started
        assert result["shipped"] == args.file_lines, result
        assert (
            client.count(index=logs.LOGS_INDEX, query={"term": {"labels.task_id": "file"}})["count"] == args.file_lines
        )
        print(
            f"task log file of {args.file_lines} lines: documents + spool in {converted:.1f} s, "
            f"shipped in {file_shipped:.1f} s",
            flush=True,
        )

        sample = [
            logs.document({**labels, "task_id": "single"}, i, "INFO", "bench", f"line {i}")
            for i in range(args.baseline_docs)
        ]
        started = time.perf_counter()
        for doc in sample:
            client.index(index="bench-single", id=doc["_id"], document={k: v for k, v in doc.items() if k != "_id"})
        single = time.perf_counter() - started
        print(f"shipped in {shipped:.1f} s; {args.baseline_docs} single requests in {single:.1f} s", flush=True)

        delays = []
        for i in range(20):
            with logs.capture(home, {**labels, "task_id": f"delay-{i}"}):
                t0 = time.perf_counter()
                log.info("delay probe %d", i)
            deadline = time.monotonic() + 30
            while not client.count(index=logs.LOGS_INDEX, query={"term": {"labels.task_id": f"delay-{i}"}})["count"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"delay probe {i} never became searchable")
                time.sleep(0.01)
            delays.append(time.perf_counter() - t0)
        running = []  # a line logged by a task that keeps running: the live flusher's delay
        for i in range(10):
            with logs.capture(home, {**labels, "task_id": f"running-{i}"}):
                t0 = time.perf_counter()
                log.info("running probe %d", i)
                deadline = time.monotonic() + 30
                while not client.count(index=logs.LOGS_INDEX, query={"term": {"labels.task_id": f"running-{i}"}})[
                    "count"
                ]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"running probe {i} never became searchable while its task ran")
                    time.sleep(0.01)
                running.append(time.perf_counter() - t0)
    finally:
        client.close()
        node.remove()

    ours = args.docs / (spooled + shipped)
    baseline = args.baseline_docs / single
    print("\n| path | documents | seconds | documents/s |\n|---|---|---|---|")
    print(f"| spool (write + fsync per line) | {args.docs} | {spooled:.1f} | {args.docs / spooled:,.0f} |")
    print(f"| ship (bulk, 2,000 per request) | {args.docs} | {shipped:.1f} | {args.docs / shipped:,.0f} |")
    print(f"| ours end to end (spool + ship) | {args.docs} | {spooled + shipped:.1f} | {ours:,.0f} |")
    whole = converted + file_shipped
    print(
        f"| task log file -> documents + spool (fsync once) | {args.file_lines} | {converted:.1f} | "
        f"{args.file_lines / converted:,.0f} |"
    )
    print(
        f"| task log file documents: ship | {args.file_lines} | {file_shipped:.1f} | "
        f"{args.file_lines / file_shipped:,.0f} |"
    )
    print(
        f"| task log file end to end (every line a task writes) | {args.file_lines} | {whole:.1f} | "
        f"{args.file_lines / whole:,.0f} |"
    )
    print(f"| baseline: one request per document | {args.baseline_docs} | {single:.1f} | {baseline:,.0f} |")
    print(
        f"\nratio ours / baseline: {ours / baseline:.1f}x (task log file path: "
        f"{args.file_lines / whole / baseline:.1f}x)"
    )
    print(
        f"log line -> searchable (ship at task end + refresh): median {statistics.median(delays) * 1000:.0f} ms, "
        f"max {max(delays) * 1000:.0f} ms over 20"
    )
    print(
        f"log line -> searchable while its task still runs (live flush every "
        f"{os.environ.get('GITOPS_ML_LOG_FLUSH_SECONDS', '1')} s + ES refresh): median "
        f"{statistics.median(running) * 1000:.0f} ms, max {max(running) * 1000:.0f} ms over 10"
    )


if __name__ == "__main__":
    main()
