"""Pipeline steps on the real demo repository, without Airflow and without training."""

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from gitops_ml import pipeline
from gitops_ml.payloads import Prepared, Pulled, Resolved


def test_steps_before_training_and_workspace_recreated_on_another_worker(settings, demo_repo):
    resolved = pipeline.resolve(settings, demo_repo["commit_sha"][:8])
    commit = resolved.commit
    assert commit.commit_sha == demo_repo["commit_sha"] and resolved.existing_version is None
    prepared = pipeline.prepare(settings, commit)
    assert Path(prepared.workdir).name == commit.commit_sha
    pulled = pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)
    assert pulled.data_hash == demo_repo["data_hash"] and pulled.nfiles == 1797
    assert sum(pulled.class_counts.values()) == 1797 and len(pulled.class_names) == 10

    # What XCom stores is small JSON, and reads back as the same payload.
    for payload, kind in ((resolved, Resolved), (prepared, Prepared), (pulled, Pulled)):
        assert kind.model_validate(payload.dump()) == payload
    with pytest.raises(ValidationError, match="data_hash"):
        Pulled.model_validate({k: v for k, v in pulled.dump().items() if k != "data_hash"})

    # A worker that never ran prepare/pull (CeleryExecutor) gets the same verified data back.
    shutil.rmtree(settings.work_dir)
    shutil.rmtree(settings.git_cache_dir)
    data_dir = pipeline.ensure_workspace(settings, commit, prepared.params)
    assert data_dir == pulled.path
    assert sum(1 for p in Path(data_dir).rglob("*.png")) == 1797
