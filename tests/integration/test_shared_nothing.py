"""Steps of one run on workers that share no disk (CeleryExecutor): each has its own ``GITOPS_ML_HOME``.

``resolve_commit`` fetched into one worker's Git mirror; ``prepare_workspace``, ``pull_data`` and the
training steps may each land on another worker, whose mirror lacks the commit and which cannot read
a path handed over in XCom.  Each step must work from its own home alone (and never touch another's).
"""

from __future__ import annotations

import pytest

from gitops_ml import pipeline

pytestmark = pytest.mark.integration


def test_each_step_works_from_its_own_home(settings, demo_repo, tmp_path):
    homes = {name: settings.with_overrides(home=tmp_path / name) for name in ("resolve", "prepare", "pull", "train")}
    resolved = pipeline.resolve(homes["resolve"], None)
    commit = resolved.commit
    assert commit.commit_sha == demo_repo["commit_sha"]

    prepared = pipeline.prepare(homes["prepare"], commit)  # no mirror here: it fetches its own
    assert prepared.workdir == str(tmp_path / "prepare" / "work" / commit.commit_sha)

    (tmp_path / "prepare").rename(tmp_path / "gone")  # the other worker's disk is out of reach
    pulled = pipeline.pull_data(homes["pull"], commit, prepared.workdir, prepared.params)
    assert pulled.data_hash == demo_repo["data_hash"]
    assert (tmp_path / "pull" / "work" / commit.commit_sha / "data" / "images").is_dir()
    assert not (tmp_path / "prepare").exists()

    data_dir = pipeline.ensure_workspace(homes["train"], commit, prepared.params)
    assert data_dir == str(tmp_path / "train" / "work" / commit.commit_sha / "data" / "images")
    assert sum(1 for _ in (tmp_path / "train" / "work" / commit.commit_sha / "data" / "images").rglob("*.png")) == sum(
        pulled.class_counts.values()
    )
