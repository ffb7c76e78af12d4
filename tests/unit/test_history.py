"""The GitOps page's rows from plain values (``gitops_ml.history``): no Airflow, no MLflow."""

from pathlib import Path

from gitops_ml import history
from gitops_ml.config import Settings

SHA = "a" * 40
OTHER = "b" * 40


def settings(**overrides):
    return Settings(
        home=Path("/nonexistent"),
        repo_url="https://github.com/acme/models.git",
        mlflow_ui_url="http://mlflow.example",
        **overrides,
    )


def run(state="success", conf=None, tasks=None, xcom=None, run_id=f"commit__{SHA}"):
    return {
        "dag_id": "gitops_ml_pipeline",
        "run_id": run_id,
        "state": state,
        "conf": conf or {},
        "start_date": "2026-12-01T07:00:00+00:00",
        "end_date": "2026-12-01T07:01:05+00:00",
        "note": "",
        "tasks": tasks or {},
        "xcom": xcom or {},
    }


def version(number, **tags):
    return {"version": number, "run_id": f"run{number}", "experiment_id": "7", "tags": tags}


def final(summary, **fields):
    return {
        "_id": "x",
        "@timestamp": "2026-12-01T07:01:05+00:00",
        "labels": {"run_id": f"commit__{SHA}"},
        "event": {"action": "pipeline", "outcome": "success"},
        "summary": summary,
        **fields,
    }


def test_commit_url_only_for_browsable_hosts_and_never_with_credentials():
    assert (
        history.commit_url("https://github.com/acme/models.git", SHA) == f"https://github.com/acme/models/commit/{SHA}"
    )
    assert history.commit_url("git@gitlab.com:acme/models.git", SHA) == f"https://gitlab.com/acme/models/-/commit/{SHA}"
    assert (
        history.commit_url("https://oauth2:tok@github.com/acme/m.git", SHA) == f"https://github.com/acme/m/commit/{SHA}"
    )
    assert history.commit_url("/srv/git/models", SHA) is None
    assert history.commit_url("https://git.internal/acme/models.git", SHA) is None
    assert history.commit_url("javascript:alert(1)//github.com", SHA) is None


def test_sha_from_resolved_commit_then_conf_then_run_id():
    assert history.commit_sha_of(run()) == SHA
    assert history.commit_sha_of(run(run_id="manual__x", conf={"commit_sha": OTHER})) == OTHER
    resolved = {"resolve_commit": {"commit": {"commit_sha": OTHER}}}
    assert history.commit_sha_of(run(run_id="manual__x", xcom=resolved)) == OTHER
    assert history.commit_sha_of(run(run_id="asset_triggered__2026")) is None


def test_decisions():
    trained = run(tasks={"train": {"state": "success"}})
    assert history.decision_of(trained, None, True)["text"] == "trained"
    reused = run(tasks={"train": {"state": "skipped"}}, xcom={"prepare_workspace": {"reuse_version": "4"}})
    assert history.decision_of(reused, None, True)["text"] == "reused version 4"
    no_retrain = run(conf={"decision": "no_retrain", "reason": "no retrain needed: only README.md changed"})
    assert history.decision_of(no_retrain, None, True) == {
        "kind": "no_retrain",
        "text": "NO RETRAIN NEEDED",
        "detail": "no retrain needed: only README.md changed",
    }
    rejected = run(xcom={"outcome": f"REJECTED commit {SHA}: unsigned"})
    assert history.decision_of(rejected, None, True)["text"] == "REJECTED signature"
    assert history.decision_of(trained, None, False)["text"] == "force-pushed away"
    superseded = {"superseded_by": OTHER, "summary": "NOT DEPLOYED: ..."}
    assert history.decision_of(trained, superseded, True)["text"] == f"superseded by {OTHER[:10]}"
    running = run(state="running", tasks={"train": {"state": "running"}, "pull_data": {"state": "success"}})
    assert history.decision_of(running, None, True)["text"] == "running: train"
    failed = run(state="failed", tasks={"pull_data": {"state": "failed"}, "train": {"state": "upstream_failed"}})
    assert history.decision_of(failed, None, True)["text"] == "FAILED in step pull_data"


def test_gate_from_the_evaluate_step_with_both_accuracies_and_the_reasons():
    evaluated = run(
        xcom={
            "evaluate": {
                "test_accuracy": 0.91,
                "champion_accuracy": 0.95,
                "champion_version": "2",
                "gate_passed": False,
                "gate_reasons": ["accuracy dropped by 0.04"],
            }
        }
    )
    gate = history.gate_of(evaluated, {})
    assert gate["passed"] is False and gate["reasons"] == ["accuracy dropped by 0.04"]
    assert (gate["challenger_accuracy"], gate["champion_accuracy"], gate["champion_version"]) == (0.91, 0.95, "2")
    from_tags = history.gate_of(run(), {"gate": "failed", "gate_reasons": "a; b", "test_accuracy": "0.5"})
    assert from_tags["reasons"] == ["a", "b"] and from_tags["challenger_accuracy"] == 0.5
    assert history.gate_of(run(), {}) is None


def test_deploy_outcomes():
    promoted = {"promoted": True, "deployed": True, "replaced_version": "2"}
    assert history.deploy_of(version("3"), promoted, "3", None) == {
        "kind": "promoted",
        "text": "promoted",
        "serving": True,
        "detail": "replaced version 2",
    }
    failed = history.deploy_of(
        version("4", gate="failed"), {"gate": "failed", "deployed": False, "summary": "NOT PROMOTED: x"}, "3", None
    )
    assert failed["kind"] == "not_promoted" and failed["serving"] is False
    rolled = history.deploy_of(
        version("3", deploy_outcome="rolled_back", rollback_reason="rolled back by ann"), {"promoted": True}, "2", None
    )
    assert rolled["kind"] == "rolled_back" and rolled["detail"] == "rolled back by ann"
    manual = history.deploy_of(version("2"), None, "2", {"action": "rolled back", "by": "ann", "reason": "bad"})
    assert manual == {"kind": "manual", "text": "rolled back by ann", "serving": True, "detail": "bad"}


def test_row_links_and_roll_back_offer():
    v1 = version("1", commit_sha=SHA, gate="passed", deploy_outcome="promoted", deployed_at="t", data_hash="d" * 32)
    r = run(
        tasks={"train": {"state": "success"}},
        xcom={
            "train": {"run_id": "abc", "experiment_id": "7"},
            "register": {"model_version": "1"},
            "resolve_commit": {
                "commit": {
                    "commit_sha": SHA,
                    "message": "Tune it\n\nbody",
                    "author": "Ann",
                    "repo_url": "https://github.com/acme/models.git",
                }
            },
        },
    )
    row = history.row(
        settings(),
        r,
        [final("PROMOTED: version 1 ...", promoted=True, deployed=True)],
        {"1": v1},
        champion="2",
        commit_info={"on_branch": True},
        kibana_url="http://kibana:5601",
    )
    assert row["message"] == "Tune it" and row["author"] == "Ann"
    assert row["run"]["duration_s"] == 65.0
    assert row["can_roll_back"] is True  # promoted once, gate passed, not the champion
    assert row["links"]["mlflow_run"] == "http://mlflow.example/#/experiments/7/runs/abc"
    assert row["links"]["mlflow_version"] == "http://mlflow.example/#/models/gitops-ml-classifier/versions/1"
    assert row["links"]["airflow_run"] == f"/dags/gitops_ml_pipeline/runs/commit__{SHA}"
    assert row["links"]["commit"] == f"https://github.com/acme/models/commit/{SHA}"
    assert row["links"]["logs"].startswith("http://kibana:5601/app/discover") and SHA in row["links"]["logs"]
    assert row["links"]["logs_command"] == f"gitops-ml logs {SHA}"
    assert [t["task_id"] for t in row["run"]["tasks"]] == list(history.TASK_ORDER)
    as_champion = history.row(settings(), r, [], {"1": v1}, champion="1", commit_info=None)
    assert as_champion["can_roll_back"] is False and as_champion["links"]["logs"] is None


def test_now_serving_flags_a_replica_that_disagrees_with_the_alias():
    champion = version("3", commit_sha=SHA, served_for_commit=OTHER, data_hash="d1", deployed_at="2026-12-01T07:00:00Z")
    replicas = [
        {"url": "http://a", "reachable": True, "serving": {"model_version": "3", "commit_sha": OTHER}},
        {"url": "http://b", "reachable": True, "serving": {"model_version": "2", "commit_sha": SHA}},
        {"url": "http://c", "reachable": False, "error": "ConnectError"},
    ]
    now = history.now_serving(champion, replicas, {"message": "Revert", "author": "Ann"})
    assert now["commit_sha"] == OTHER and now["built_from_commit"] == SHA and now["model_version"] == "3"
    assert [r["agrees"] for r in now["replicas"]] == [True, False, False] and now["all_agree"] is False
    assert history.now_serving(None, [{"url": "http://a", "reachable": True, "serving": None}], None)["all_agree"]


def test_section_of_a_watch_pages_and_the_manual_rollback_row():
    champion = version(
        "1",
        commit_sha=SHA,
        manual_deploy_at="2026-12-01T08:00:00Z",
        manual_deploy_by="ann",
        manual_deploy_action="rolled back",
        replaced_version="2",
    )
    section = history.section(
        settings(model_name="vision", branch="dev"),
        "fork",
        [run(run_id=f"commit__{OTHER}__fork", conf={"watch": "fork"}, xcom={"register": {"model_version": "1"}})],
        total=60,
        page=2,
        per_page=25,
        versions={"1": champion},
        champion=champion,
        replicas=[],
        commits={},
        records_of=lambda sha: [],
    )
    assert (section["watch"], section["model_name"], section["branch"]) == ("fork", "vision", "dev")
    assert section["repository"] == "https://github.com/acme/models.git"
    assert [r["commit_sha"] for r in section["rows"]] == [OTHER]
    assert section["rows"][0]["links"]["mlflow_version"] == "http://mlflow.example/#/models/vision/versions/1"
    assert section["now_serving"]["model_version"] == "1"
    assert (section["page"], section["pages"], section["total"]) == (2, 3, 60)
    assert section["actions"] == [
        {
            "action": "rolled back",
            "by": "ann",
            "at": "2026-12-01T08:00:00Z",
            "model_version": "1",
            "commit_sha": SHA,
            "replaced_version": "2",
            "reason": None,
        }
    ]
    assert section["running"] is False


def test_recall_floor_and_worst_class_from_the_version_tags():
    evaluated = run(xcom={"evaluate": {"test_accuracy": 0.9, "gate_passed": False, "gate_reasons": ["recall"]}})
    tags = {"min_class_recall": "0.7", "worst_class": "dog", "worst_class_recall": "0.6"}
    gate = history.gate_of(evaluated, tags)
    assert (gate["recall_floor"], gate["worst_class"], gate["worst_class_recall"]) == (0.7, "dog", 0.6)
    assert gate["recall_passed"] is False
    assert history.gate_of(evaluated, {**tags, "worst_class_recall": "0.7"})["recall_passed"] is True
    no_floor = history.gate_of(evaluated, {"worst_class": "cat", "worst_class_recall": "0.93"})
    assert no_floor["recall_floor"] is None and no_floor["recall_passed"] is None
    assert no_floor["worst_class_recall"] == 0.93


def test_run_note_lines_say_the_decision_and_the_gate_result():
    evaluated = {
        "evaluate": {
            "test_accuracy": 0.96114,
            "champion_accuracy": 0.95833,
            "champion_version": "2",
            "gate_passed": True,
            "gate_reasons": [],
        }
    }
    assert history.note_lines(evaluated) == [
        "decision: trained; gate passed: test accuracy 0.9611 against champion version 2's 0.9583"
    ]
    first = {"evaluate": {"test_accuracy": 0.5, "champion_accuracy": None, "gate_passed": False}}
    assert history.note_lines(first) == [
        "decision: trained; gate FAILED: test accuracy 0.5000 (no champion to compare with)"
    ]
    assert history.note_lines({"prepare_workspace": {"reuse_version": "4"}}) == [
        "decision: reused version 4 (same data, params and model code), not retrained"
    ]
    assert history.note_lines({}) == []
