"""Log documents against a real Elasticsearch: template, shipping, filters, exactly once, outage, secrets."""

import logging
import shutil

import pytest

from gitops_ml import logs

SHA = "a" * 40
LABELS = {
    "commit_sha": SHA,
    "repo_url": "https://git.example.com/org/models.git",
    "branch": "main",
    "dag_id": "gitops_ml_pipeline",
    "run_id": f"commit__{SHA}",
    "task_id": "train",
    "try_number": 1,
}
log = logging.getLogger("gitops_ml.test")


def count(client, **term):
    client.indices.refresh(index=f"{logs.LOGS_INDEX}*")
    query = {"bool": {"filter": [{"term": {k: v}} for k, v in term.items()]}}
    return client.count(index=f"{logs.LOGS_INDEX}*", query=query)["count"]


def test_template_installs_idempotently_with_explicit_mappings(es):
    client, _ = es
    logs.install_template(client)
    logs.install_template(client)
    template = client.indices.get_index_template(name=logs.TEMPLATE_NAME)["index_templates"][0]["index_template"]
    props = template["template"]["mappings"]["properties"]
    assert props["@timestamp"]["type"] == "date" and props["labels"]["properties"]["commit_sha"]["type"] == "keyword"
    assert template["template"]["settings"]["index"]["number_of_replicas"] == "0"


def test_lines_ship_once_and_filter_by_sha_task_level(es, tmp_path):
    client, _ = es
    with logs.capture(tmp_path, LABELS):
        for i in range(50):
            log.info("epoch %d done", i)
        log.warning("learning rate is high")
    with logs.capture(tmp_path, {**LABELS, "task_id": "evaluate"}):
        log.error("champion missing")
    assert logs._segments(tmp_path) == []  # shipped and removed
    assert count(client, **{"labels.commit_sha": SHA}) == 52
    assert len(logs.search(tmp_path, SHA, task_id="train")) == 51
    errors = logs.search(tmp_path, SHA[:10], level="error")
    assert [d["message"] for d in errors] == ["champion missing"]
    first = logs.search(tmp_path, SHA, task_id="train")[0]
    assert first["log_id"] == f"gitops_ml_pipeline-train-commit__{SHA}--1-1" and first["offset"] == 1
    assert first["service"]["name"] == "gitops-ml" and first["event"]["dataset"] == "gitops_ml.task"


def test_reshipping_never_duplicates(es, tmp_path):
    client, _ = es
    with logs.capture(tmp_path, LABELS, ship_after=False) as handler:
        for i in range(20):
            log.info("line %d", i)
    saved = tmp_path / "copy.jsonl"
    shutil.copy(handler.path, saved)
    logs.ship(tmp_path)
    shutil.copy(saved, handler.path)  # as if the process died after the bulk request, before deleting
    logs.ship(tmp_path)
    assert count(client, **{"labels.commit_sha": SHA}) == 20


def test_outage_keeps_documents_and_delivers_them_once_when_back(es, tmp_path):
    client, node = es
    if node is None:
        pytest.fail("this test stops and starts the node it started; unset ES_URL to run it")
    node.stop()
    with logs.capture(tmp_path, LABELS):  # shipping fails quietly: the task goes on
        for i in range(30):
            log.info("while Elasticsearch is down %d", i)
    assert sum(len(logs.read_segment(p)) for p in logs._segments(tmp_path)) == 30
    node.start()
    result = logs.ship(tmp_path)
    assert result == {"shipped": 30, "kept": 0, "dropped": 0}
    assert count(client, **{"labels.commit_sha": SHA}) == 30


def test_secrets_invalid_utf8_and_huge_lines(es, tmp_path):
    labels = {**LABELS, "repo_url": "https://deploy:ghp_SECRET42@git.example.com/org/models.git"}
    with logs.capture(tmp_path, labels):
        log.info("fetching https://deploy:ghp_SECRET42@git.example.com/org/models.git")
        log.info(b"bytes \xff\xfe not utf-8".decode("utf-8", "surrogateescape"))  # as subprocess output arrives
        log.info("x" * (2 * 1024 * 1024))
    docs = logs.search(tmp_path, SHA)
    assert len(docs) == 3
    assert all("ghp_SECRET42" not in str(d) for d in docs)
    assert docs[1]["message"].startswith("bytes ") and docs[1]["message"].encode("utf-8")  # valid UTF-8 now
    assert docs[2]["gitops_ml"] == {"truncated": True, "original_bytes": 2 * 1024 * 1024}
    assert len(docs[2]["message"].encode()) < 70 * 1024


def test_without_elasticsearch_the_spool_is_the_store_and_is_capped(tmp_path, monkeypatch):
    monkeypatch.delenv("ES_URL", raising=False)
    with logs.capture(tmp_path, {**LABELS, "run_id": "r1"}):
        log.info("one")
    with logs.capture(tmp_path, {**LABELS, "run_id": "r2"}):
        log.info("two")
    assert [d["message"] for d in logs.search(tmp_path, SHA)] == ["one", "two"]
    size = sum(p.stat().st_size for p in logs._segments(tmp_path))
    assert logs.enforce_cap(tmp_path, max_bytes=size - 1) == 1
    assert [d["message"] for d in logs.search(tmp_path, SHA)] == ["two"]
