"""The sentence that ends a run's note and its final record: one per outcome, naming version and SHA."""

from gitops_ml.airflow.run_note import MAX_NOTE, with_outcome
from gitops_ml.pipeline import summary


def test_summary_names_each_outcome():
    sha = "a" * 40
    assert (
        summary("3", {"deployed": True, "promoted": True, "replaced_version": "2"})
        == "PROMOTED: version 3 replaced version 2"
    )
    assert summary("1", {"deployed": True, "promoted": True}) == "PROMOTED: version 1 is the first model served"
    assert summary("1", {"deployed": True, "promoted": False}) == "SERVING: version 1 (already the champion)"
    assert (
        summary("2", {"deployed": True, "promoted": True, "replaced_version": "4", "reused_from_commit": sha})
        == f"PROMOTED: version 2 (reused, built from commit {sha}) replaced version 4"
    )
    assert (
        summary("5", {"gate": "failed", "gate_reasons": "accuracy 0.5 is below gate.min_accuracy 0.8"})
        == "NOT PROMOTED: version 5 failed the gate: accuracy 0.5 is below gate.min_accuracy 0.8"
    )
    assert summary("6", {"superseded_by": sha}).startswith(f"NOT DEPLOYED: version 6 is older than commit {sha}")


def test_note_gets_the_outcome_once_and_stays_within_the_column():
    note = with_outcome("push: build commit abc", "PROMOTED: version 2 replaced version 1")
    assert note == "push: build commit abc\nPROMOTED: version 2 replaced version 1"
    assert with_outcome(note, "PROMOTED: version 2 replaced version 1") == note
    assert with_outcome(None, "FAILED in step train: boom") == "FAILED in step train: boom"
    long = with_outcome("x" * 990, "FAILED in step train: " + "y" * 100)
    assert len(long) == MAX_NOTE and long.endswith("…")
