"""Bounded disk: work trees of finished runs are removed, the DVC cache keeps what is needed.

Real Git work trees of the demo repository (bare mirror + ``git worktree``), a real DVC remote and
cache, a real MLflow registry.  A "run" here is the real pipeline steps up to the data (resolve,
prepare, pull_data) and the real end of a run (``pipeline.finish``, or ``retention.after_run(...,
failed=True)`` as the failure callback calls it); training is left out except where a model version
must exist (the DVC cache test registers one with ``run_local``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gitops_ml import data, flow, pipeline, registry, retention, source
from gitops_ml.errors import DataError
from gitops_ml.payloads import Commit
from tests.helpers import BIN, change_demo_images, commit_file, git

pytestmark = pytest.mark.integration

DATA = "data/images"


def start_run(settings, commit_sha: str) -> Commit:
    """The steps of a run that use the work tree: check out and pull (the run is now in progress)."""
    commit = pipeline.resolve(settings, commit_sha).commit
    prepared = pipeline.prepare(settings, commit)
    pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)
    return commit


def finished_run(settings, commit_sha: str) -> Commit:
    commit = start_run(settings, commit_sha)
    pipeline.finish(settings, commit, f"test__{commit_sha[:12]}", None, None, reused=False)
    return commit


def failed_run(settings, commit_sha: str) -> None:
    """A run whose pull_data fails; its end is what the failure callback does."""
    commit = pipeline.resolve(settings, commit_sha).commit
    prepared = pipeline.prepare(settings, commit)
    with pytest.raises(DataError):
        pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)
    assert retention.after_run(settings, commit_sha, failed=True, run_id=f"test__{commit_sha[:12]}") is not None


def trees(settings) -> set[str]:
    return {p.name for p in settings.work_dir.iterdir() if p.name != retention.STATE_DIR}


def git_worktrees(settings) -> set[str]:
    """The non-bare work trees the mirror's ``git worktree list`` knows (by folder name)."""
    mirror = source.mirror_path(settings.repo_url, settings.git_cache_dir)
    listing = subprocess.run(
        ["git", "-C", str(mirror), "worktree", "list", "--porcelain"], check=True, capture_output=True, text=True
    ).stdout
    blocks = [b for b in listing.strip().split("\n\n") if "\nbare" not in b and not b.endswith("bare")]
    return {Path(b.splitlines()[0].removeprefix("worktree ")).name for b in blocks}


def cache_objects(settings) -> set[str]:
    root = settings.dvc_cache_dir / "files" / "md5"
    return {p.parent.name + p.name for p in root.glob("*/*") if p.is_file()}


def objects_of(repo: Path, remote: Path, commit_sha: str) -> set[str]:
    """What a commit's data needs, computed from the repository and the remote (not from the cache)."""
    import yaml

    pointer = yaml.safe_load(git(repo, "show", f"{commit_sha}:{DATA}.dvc"))
    dir_md5 = pointer["outs"][0]["md5"]
    manifest = json.loads((remote / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).read_bytes())
    return {dir_md5} | {entry["md5"] for entry in manifest}


def remove_from_remote(remote: Path, repo: Path, relpath: str) -> None:
    md5 = hashlib.md5((repo / DATA / relpath).read_bytes()).hexdigest()
    (remote / "files" / "md5" / md5[:2] / md5[2:]).unlink()


def test_keeps_the_latest_n_by_finish_time_and_the_failed_one(settings, demo_repo):
    repo, remote = demo_repo["path"], demo_repo["remote"]
    settings = settings.with_overrides(keep_worktrees=2, keep_failed_hours=24)
    shas = [demo_repo["commit_sha"]]
    for i in range(4):
        shas.append(commit_file(repo, "README.md", f"change {i}\n", f"readme {i}"))
    broken = change_demo_images(repo, str(remote), 99, "data whose new image never reached the remote")
    remove_from_remote(remote, repo, "7/extra.png")

    # N + 3 = 5 finished runs; the third commit's run finishes last (a re-run), the broken one fails between.
    for sha in (shas[0], shas[1], shas[3]):
        finished_run(settings, sha)
    failed_run(settings, broken)
    finished_run(settings, shas[4])
    finished_run(settings, shas[2])

    kept = {shas[4], shas[2], broken}
    assert trees(settings) == kept
    assert git_worktrees(settings) == kept  # removed through git: its list has no stale entries
    marks = json.loads((settings.work_dir / retention.STATE_DIR / f"{broken}.json").read_text())
    assert marks["outcome"] == "failed"

    report = retention.collect(settings)  # idempotent: a second pass removes nothing
    assert report.removed == {} and report.cache_objects_removed == 0 and report.cache_skipped is None
    assert "failed 0.0 h ago" in report.kept[broken] and report.kept[shas[2]].startswith("finished, latest 1")

    # The failed run's tree goes once it is older than GITOPS_ML_KEEP_FAILED_HOURS.
    report = retention.collect(settings, now=time.time() + 25 * 3600)
    assert set(report.removed) == {broken} and "failed 25.0 h ago (kept 24 h)" in report.removed[broken]
    assert trees(settings) == git_worktrees(settings) == {shas[4], shas[2]}
    assert not (settings.work_dir / retention.STATE_DIR / f"{broken}.json").exists()


def test_a_run_in_progress_is_never_removed(settings, demo_repo):
    repo, remote = demo_repo["path"], demo_repo["remote"]
    settings = settings.with_overrides(keep_worktrees=0, keep_failed_hours=0)
    first = demo_repo["commit_sha"]
    second = change_demo_images(repo, str(remote), 1, "more data")
    running_commit = start_run(settings, second)  # checked out and pulled, not finished
    running = running_commit.commit_sha

    finished_run(settings, first)  # keeps 0 finished work trees: its own goes, the running one stays
    assert trees(settings) == {running}
    report = retention.collect(settings)
    assert report.kept == {running: "run in progress"} and report.removed == {}
    assert objects_of(repo, remote, running) <= cache_objects(settings)  # its data stays in the cache too
    only_first = objects_of(repo, remote, first) - objects_of(repo, remote, running)
    assert len(only_first) == 3 and not only_first & cache_objects(settings)  # 2 replaced images + manifest

    # Finished (kept as the latest 1), then checked out again by a re-run: in progress until that run ends.
    pipeline.finish(settings.with_overrides(keep_worktrees=1), running_commit, "r1", None, None, False)
    assert trees(settings) == {running}
    start_run(settings, running)  # the re-run's `git reset --hard` rewrites the index: the mark no longer matches
    report = retention.collect(settings)
    assert report.kept == {running: "checked out again since its run ended (in progress)"}
    assert trees(settings) == {running}

    # A tree no run ever finished (its worker died before the failure callback) goes after a day.
    report = retention.collect(settings, now=time.time() + 25 * 3600)
    assert set(report.removed) == {running} and "abandoned" in report.removed[running]
    assert trees(settings) == git_worktrees(settings) == set()


def test_dvc_cache_keeps_exactly_what_retained_trees_and_model_versions_need(settings, demo_repo):
    repo, remote = demo_repo["path"], demo_repo["remote"]
    settings = settings.with_overrides(keep_worktrees=1)
    champion_sha = demo_repo["commit_sha"]
    result = flow.run_local(settings, champion_sha, deploy_model=False)  # version 1, alias challenger
    registry.set_alias(settings, result.model_version)  # and champion
    shas = [change_demo_images(repo, str(remote), seed, f"data {seed}") for seed in (1, 2, 3)]
    for sha in shas:
        finished_run(settings, sha)
    removed, last = shas[:2], shas[2]
    assert trees(settings) == {last}

    needed = objects_of(repo, remote, last) | objects_of(repo, remote, champion_sha)
    assert cache_objects(settings) == needed
    gone = (objects_of(repo, remote, removed[0]) | objects_of(repo, remote, removed[1])) - needed
    assert len(gone) == 8 and not gone & cache_objects(settings)  # each: its .dir manifest + 3 own images

    # Prove that nothing retained needs a download: the remote is unreachable from here on.
    remote.rename(remote.with_name("remote-unreachable"))
    tree = settings.work_dir / last
    shutil.rmtree(tree / DATA)
    assert data.pull(tree, DATA, settings.dvc_cache_dir).nfiles == 1797 + 1
    champion = finished_run(settings, champion_sha)  # its work tree was removed: checked out and pulled again
    assert champion.commit_sha == champion_sha and trees(settings) == {champion_sha}
    commit = pipeline.resolve(settings, removed[0]).commit
    prepared = pipeline.prepare(settings, commit)
    with pytest.raises(DataError, match="directory manifest"):  # its objects are gone and need the remote
        pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)


def test_cleanup_failure_never_fails_the_run_and_paths_outside_home_are_refused(settings, demo_repo, tmp_path):
    sha = demo_repo["commit_sha"]
    report = retention.after_run(settings, "0" * 40, failed=True)  # a run that failed before any checkout
    assert "no work folder" in report.cache_skipped and not settings.work_dir.exists()
    bad = settings.with_overrides(keep_worktrees=0, keep_failed_hours=-1)
    commit = finished_run(bad, sha)  # the run ends normally; the cleanup only warns
    assert commit.commit_sha == sha and trees(settings) == {sha}
    with pytest.raises(retention.RetentionError, match="GITOPS_ML_KEEP_FAILED_HOURS must be 0 or more"):
        retention.collect(bad)

    # A work folder that is a link to somewhere else is refused; nothing there is touched.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ("a" * 40)).mkdir()
    moved = settings.home / "work-real"
    settings.work_dir.rename(moved)
    settings.work_dir.symlink_to(outside)
    with pytest.raises(retention.RetentionError, match="is a symbolic link"):
        retention.collect(settings.with_overrides(keep_worktrees=0))
    assert (outside / ("a" * 40)).is_dir()
    settings.work_dir.unlink()
    moved.rename(settings.work_dir)

    # A work tree entry that is a link is never followed or removed.
    link = settings.work_dir / ("b" * 40)
    link.symlink_to(outside / ("a" * 40))
    retention.mark_finished(settings, "b" * 40, failed=False)
    retention.mark_finished(settings, sha, failed=False)
    report = retention.collect(settings.with_overrides(keep_worktrees=0))
    assert set(report.removed) == {sha} and link.is_symlink() and (outside / ("a" * 40)).is_dir()


def test_gc_command_dry_run_then_for_real(settings, demo_repo):
    repo = demo_repo["path"]
    second = commit_file(repo, "README.md", "again\n", "readme")
    for sha in (demo_repo["commit_sha"], second):
        finished_run(settings, sha)
    env = {**os.environ, "GITOPS_ML_KEEP_WORKTREES": "1"}
    before = cache_objects(settings)
    dry = subprocess.run(
        [str(BIN / "gitops-ml"), "gc", "--dry-run"], env=env, capture_output=True, text=True, check=False
    )
    assert dry.returncode == 0, dry.stderr
    assert f"would remove  {demo_repo['commit_sha']}  finished, older than the latest 1" in dry.stdout
    assert trees(settings) == {demo_repo["commit_sha"], second} and cache_objects(settings) == before
    real = subprocess.run([str(BIN / "gitops-ml"), "gc"], env=env, capture_output=True, text=True, check=False)
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("removed 1 work tree(s)") and trees(settings) == git_worktrees(settings) == {second}
    off = subprocess.run(
        [str(BIN / "gitops-ml"), "gc"],
        env={**env, "GITOPS_ML_KEEP_WORKTREES": "-1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert off.stdout.startswith("retention is off") and trees(settings) == {second}
