"""Run records: a commit SHA from untrusted run conf never becomes a path outside the records folder."""

import pytest

from gitops_ml import records


@pytest.mark.parametrize("commit_sha", ["../../escaped", "/tmp/escaped", "..", "abc/../../x", "ABCDEF" * 7, ""])
def test_untrusted_commit_sha_goes_to_unresolved(tmp_path, commit_sha):
    folder = tmp_path / "home" / "records"
    written = records.write(folder, records.outcome_record(commit_sha, "manual__1", "train", "failure", reason="x"))
    assert written == folder / "unresolved.jsonl"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [written]
    assert records.read(written)[0]["labels"]["commit_sha"] == commit_sha


def test_full_sha_names_its_file_and_writes_once(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    doc = records.outcome_record(sha, "commit__" + sha, "deploy", "promoted")
    assert records.write(tmp_path, doc) == records.write(tmp_path, doc) == tmp_path / f"{sha}.jsonl"
    assert len(records.read(tmp_path / f"{sha}.jsonl")) == 1
