"""The same scenarios through the Airflow DAG (``dag.test()``) and through ``gitops-ml run --local``
(``flow.run_local``), each against its own real MLflow store and model server: the structured
records both write (``records/<sha>.jsonl``) are the same, apart from run ids and times.

Scenarios, in order, on one repository: a commit trained and promoted; a second one promoted over
it; the revert of the second, which reuses the first model (same inputs hash); a gate failure; a
commit the watcher decided needs no retraining; the revert again, under a watch whose signature
policy warns (the commit is unsigned); a SHA that does not exist (failure at resolve).
"""

import json

import pytest

from gitops_ml import demo, flow, records, registry
from gitops_ml.config import Settings
from tests.conftest import ServerProcess
from tests.e2e.test_dag import load_dag, task_states
from tests.helpers import commit_file, free_port, git

pytestmark = pytest.mark.e2e

MISSING = "0" * 40


def use_home(monkeypatch, home) -> Settings:
    """Point every gitops-ml setting (and so the in-process Airflow tasks) at a fresh home."""
    for key, value in {
        "GITOPS_ML_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "GITOPS_ML_ARTIFACT_ROOT": str(home / "mlflow" / "artifacts"),
        "GITOPS_ML_SERVING_URL": f"http://127.0.0.1:{free_port()}",
    }.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    registry.experiment_id(settings)
    return settings


def normalized(doc: dict, run_ids: set[str]) -> dict:
    """A record without what differs between two runs of the same scenario: ids, run ids and times."""
    doc = json.loads(json.dumps(doc))
    for key in ("_id", "@timestamp", "at", "gitops_ml_run"):
        doc.pop(key, None)
    doc["labels"].pop("run_id")
    text = json.dumps(doc, sort_keys=True)
    for run_id in run_ids:
        text = text.replace(run_id, "<run>")
    return json.loads(text)


def test_dag_and_run_local_write_the_same_records(airflow_db, settings, demo_repo, tmp_path, monkeypatch):
    repo = demo_repo["path"]
    first = demo_repo["commit_sha"]
    second = demo.bump_param(repo, "train.learning_rate", 0.004, "tune the learning rate")
    git(repo, "revert", "--no-edit", "HEAD")
    reverted = git(repo, "rev-parse", "HEAD")
    impossible = demo.bump_param(repo, "gate.min_accuracy", 0.9999, "an impossible gate")
    docs = commit_file(repo, "README.md", "notes\n", "docs only")
    watch_file = tmp_path / "watch.yaml"
    (tmp_path / "allowed_signers").write_text("")
    watch_file.write_text(
        json.dumps(
            {
                "repositories": [
                    {
                        "name": "warned",
                        "repo_url": str(repo),
                        "branch": "main",
                        "signatures": "warn",
                        "allowed_signers": str(tmp_path / "allowed_signers"),
                    }
                ]
            }
        )
    )
    scenarios = [  # (run conf, what the DAG run ends as, a watch file for this run)
        ({"commit_sha": first}, "success", False),
        ({"commit_sha": second}, "success", False),
        ({"commit_sha": reverted}, "success", False),
        ({"commit_sha": impossible}, "success", False),
        (
            {
                "commit_sha": docs,
                "decision": "no_retrain",
                "trigger": "push",
                "reason": "no retrain needed: changed only README.md",
            },
            "success",
            False,
        ),
        ({"commit_sha": reverted, "watch": "warned"}, "success", True),
        ({"commit_sha": MISSING}, "failed", False),
    ]
    written = {}
    for mode in ("airflow", "local"):
        mode_settings = use_home(monkeypatch, tmp_path / f"home-{mode}")
        server = ServerProcess(mode_settings, tmp_path / f"serve-{mode}.log")
        run_ids = set()
        try:
            for i, (conf, dag_state, watched) in enumerate(scenarios):
                if watched:
                    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(watch_file))
                else:
                    monkeypatch.delenv("GITOPS_ML_WATCH_CONFIG", raising=False)
                if mode == "airflow":
                    run = load_dag().test(run_conf=conf)
                    assert run.state == dag_state, (conf, task_states(run))
                    run_ids.add(run.run_id)
                else:
                    run_id = f"local-{i}"
                    run_ids.add(run_id)
                    if dag_state == "failed":
                        with pytest.raises(Exception, match=f"commit {conf['commit_sha']} does not exist"):
                            flow.run_local(Settings.from_env(), run_id=run_id, conf=conf)
                    else:
                        flow.run_local(Settings.from_env(), run_id=run_id, conf=conf)
            served = server.version()
        finally:
            server.stop()
        assert served["commit_sha"] == reverted and served["model_version"] == "1", (mode, served)
        written[mode] = {
            sha: [normalized(d, run_ids) for d in records.read(records.path_for(mode_settings.records_dir, sha))]
            for sha in (first, second, reverted, impossible, docs, MISSING)
        }

    outcomes = {
        sha: [(d["event"]["action"], d["event"]["outcome"]) for d in docs_] for sha, docs_ in written["local"].items()
    }
    assert outcomes == {
        first: [("deploy", "promoted"), ("pipeline", "success")],
        second: [("deploy", "promoted"), ("pipeline", "success")],
        reverted: [
            ("deploy", "promoted"),
            ("pipeline", "success"),
            ("signature", "warning"),
            ("deploy", "unchanged"),
            ("pipeline", "success"),
        ],
        impossible: [("pipeline", "not_promoted")],
        docs: [("watch", "no_retrain")],
        MISSING: [("resolve_commit", "failure")],
    }, outcomes
    assert written["local"][reverted][1]["reused_from_commit"] == first  # the revert reused the first model
    assert written["local"][reverted][2]["reason"] == f"commit {reverted} is not signed"  # the warn policy's reason
    for sha in written["airflow"]:
        assert written["airflow"][sha] == written["local"][sha], sha
