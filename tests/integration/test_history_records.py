"""The GitOps page reads run records from the run-records index of a real Elasticsearch as well as
from the local files (a worker on another machine writes its records there)."""

import pytest

from gitops_ml import history, logs, pipeline, records

pytestmark = pytest.mark.integration


def test_records_from_the_index_and_the_files_merged_once(settings, es):
    client, _ = es
    here, there = "c" * 40, "d" * 40
    pipeline.record(settings, here, f"commit__{here}", "pipeline", "success", summary="PROMOTED: v1")
    pipeline.record(settings, there, f"commit__{there}", "pipeline", "not_promoted", summary="NOT PROMOTED: v2")
    assert logs.ship(settings.home, client=client)["shipped"] == 2
    records.path_for(settings.records_dir, there).unlink()  # written on another machine: only in the index
    records_of = history.records_reader(settings, [here, there], es_client=client)
    assert [d["summary"] for d in records_of(here)] == ["PROMOTED: v1"]  # local and indexed: once
    assert [d["summary"] for d in records_of(there)] == ["NOT PROMOTED: v2"]
    assert records_of("e" * 40) == []
