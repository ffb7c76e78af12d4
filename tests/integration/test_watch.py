"""Commit detection against real Git remotes (file:// and smart HTTP through `git http-backend`):
the triggerer's trigger in an asyncio loop, the poke check, and the per-commit plan
(bursts under every/latest, force-push, path filter)."""

import asyncio
import logging
import subprocess

import pytest

from gitops_ml import watch
from gitops_ml.airflow.git_sensor import GitCommitSensor, GitCommitTrigger
from gitops_ml.errors import InvalidRef
from gitops_ml.remote_head import GitRemoteError, head_of
from tests.git_http import GitHttpServer
from tests.helpers import commit_file, git

pytestmark = pytest.mark.integration


@pytest.fixture
def remote(tmp_path):
    """A bare remote ``models.git`` with one commit on main, and a work clone that pushes to it."""
    bare = tmp_path / "remotes" / "models.git"
    bare.parent.mkdir()
    git(tmp_path, "init", "--bare", "-q", "-b", "main", str(bare))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(bare), str(work))
    git(work, "checkout", "-qb", "main")
    (work / "params.yaml").write_text("train: {epochs: 1}\n")
    first = commit_file(work, "README.md", "hello\n", "first")
    git(work, "add", "params.yaml")
    git(work, "commit", "-qm", "params")
    git(work, "push", "-q", "origin", "main")
    return {"bare": bare, "work": work, "first": first, "head": git(work, "rev-parse", "HEAD")}


def push(remote, relpath, text, message):
    sha = commit_file(remote["work"], relpath, text, message)
    git(remote["work"], "push", "-q", "origin", "main")
    return sha


async def _next_event(trigger, timeout=20):
    return await asyncio.wait_for(anext(trigger.run()), timeout)


def test_trigger_fires_on_push_over_file_url(remote):
    url = f"file://{remote['bare']}"
    trigger = GitCommitTrigger(url, "main", previous_sha=remote["head"], poll_interval=0.2)
    assert trigger.serialize()[0] == "gitops_ml.airflow.git_sensor.GitCommitTrigger"

    async def scenario():
        waiting = asyncio.ensure_future(_next_event(trigger))
        await asyncio.sleep(1.0)
        assert not waiting.done()  # nothing new yet: the trigger keeps waiting
        new_sha = await asyncio.to_thread(push, remote, "params.yaml", "train: {epochs: 2}\n", "more epochs")
        event = await waiting
        return new_sha, event

    new_sha, event = asyncio.run(scenario())
    assert event.payload == {"status": "new_commit", "head_sha": new_sha, "previous_sha": remote["head"]}


def test_trigger_and_poke_over_smart_http_with_credentials(remote, caplog):
    with GitHttpServer(remote["bare"].parent, username="bot", password="s3cret-pw") as server:
        url = server.url("models.git")
        assert head_of(url, "main") == remote["head"]
        new_sha = push(remote, "data.dvc", "outs: []\n", "new data")
        event = asyncio.run(_next_event(GitCommitTrigger(url, "main", previous_sha=remote["head"], poll_interval=0.2)))
        assert event.payload["head_sha"] == new_sha
        sensor = GitCommitSensor(task_id="s", repo_url=url, branch="main", previous_sha=new_sha)
        assert sensor.poke({}) is False  # nothing after new_sha
        bad = server.url("models.git").replace("s3cret-pw", "wrong-pw")
        with pytest.raises(GitRemoteError) as failure:
            head_of(bad, "main")
        assert "wrong-pw" not in str(failure.value) and "s3cret-pw" not in str(failure.value)
        assert server.requests > 0


def test_unreachable_remote_keeps_waiting_and_warns_without_credentials(tmp_path, capfd):
    url = "http://bot:tok-LEAK-123@127.0.0.1:9/models.git"  # port 9 (discard): nothing listens
    trigger = GitCommitTrigger(url, "main", previous_sha="", poll_interval=0.2, ls_remote_timeout=5)
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(_next_event(trigger, timeout=2.5))
    out = capfd.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "still waiting" in line]
    assert len(warnings) >= 2, out  # one warning per interval, no crash
    assert all("tok-LEAK-123" not in w and "bot" not in w and "127.0.0.1:9/models.git" in w for w in warnings)


@pytest.mark.parametrize("branch", ["--upload-pack=touch /tmp/pwned", "-b", "a..b", "x y"])
def test_option_like_or_invalid_branch_refused_before_any_git_call(branch, tmp_path):
    with pytest.raises(InvalidRef, match="invalid branch name"):
        GitCommitTrigger("file:///nonexistent", branch)
    sensor = GitCommitSensor(task_id="s", repo_url="file:///nonexistent", branch=branch)
    with pytest.raises(InvalidRef, match="invalid branch name"):
        sensor.poke({})
    assert not (tmp_path.parent / "pwned").exists()


def _watch(remote, **fields):
    return watch.Watch(name="models", repo_url=f"file://{remote['bare']}", **fields)


def test_burst_of_five_under_every_and_latest(remote, tmp_path):
    shas = [push(remote, "params.yaml", f"train: {{epochs: {i}}}\n", f"epochs {i}") for i in range(3, 8)]
    every = watch.plan_branch(_watch(remote, policy="every"), tmp_path / "git", remote["head"])
    assert [(d.commit_sha, d.action) for d in every.decisions] == [(s, "train") for s in shas]
    latest = watch.plan_branch(_watch(remote, policy="latest"), tmp_path / "git", remote["head"])
    assert [d.action for d in latest.decisions] == ["superseded"] * 4 + ["train"]
    assert all(d.superseded_by == shas[-1] for d in latest.decisions[:4])
    assert latest.decisions[-1].commit_sha == shas[-1] and latest.force_push is None


def test_path_filter_records_no_retrain(remote, tmp_path):
    docs = push(remote, "README.md", "docs only\n", "docs")
    pointer = push(remote, "images.dvc", "outs: [{md5: abc}]\n", "new images")
    plan = watch.plan_branch(_watch(remote, policy="latest"), tmp_path / "git", remote["head"])
    decisions = {d.commit_sha: d for d in plan.decisions}
    assert decisions[docs].action == "no_retrain" and "README.md" in decisions[docs].reason
    assert decisions[pointer].action == "train" and "images.dvc" in decisions[pointer].reason
    custom = watch.plan_branch(_watch(remote, paths=("*.md",)), tmp_path / "git2", remote["head"])
    assert [d.action for d in custom.decisions] == ["train", "no_retrain"]


def test_force_push_is_detected_and_reported(remote, tmp_path, caplog):
    lost = [push(remote, "params.yaml", f"train: {{epochs: {i}}}\n", f"epochs {i}") for i in (10, 11)]
    cache = tmp_path / "git"
    watch.plan_branch(_watch(remote), cache, remote["head"])  # the mirror has seen the lost commits
    git(remote["work"], "reset", "-q", "--hard", remote["head"])
    replacement = commit_file(remote["work"], "params.yaml", "train: {epochs: 99}\n", "rewrite")
    git(remote["work"], "push", "-q", "--force", "origin", "main")
    with caplog.at_level(logging.WARNING):
        plan = watch.plan_branch(_watch(remote), cache, lost[-1])
    assert plan.force_push["removed"] == list(reversed(lost)) and plan.force_push["merge_base"] == remote["head"]
    assert [(d.commit_sha, d.action) for d in plan.decisions] == [(replacement, "train")]
    assert any("force-push" in r.getMessage() and "2 commit(s) removed" in r.getMessage() for r in caplog.records)


def test_watch_config_errors_name_the_field(tmp_path):
    path = tmp_path / "watch.yaml"
    path.write_text("repositories:\n  - name: m\n    repo_url: file:///x\n    policy: sometimes\n")
    with pytest.raises(watch.WatchConfigError, match=r"repositories\[0\] \(m\): field 'policy'"):
        watch.load_watches(path)
    path.write_text("repositories:\n  - name: m\n    repo_url: file:///x\n    branch: --upload-pack=x\n")
    with pytest.raises(watch.WatchConfigError, match="field 'branch'"):
        watch.load_watches(path)
    path.write_text("repositories:\n  - name: m\n    repo_url: file:///x\n    signatures: enforce\n")
    with pytest.raises(watch.WatchConfigError, match="allowed_signers"):
        watch.load_watches(path)
    path.write_text("repositories:\n  - name: m\n    repo_url: https://u:${TOKEN_X}@h/r.git\n    poll_interval: 5\n")
    loaded = watch.load_watches(path)[0]
    assert loaded.poll_interval == 5.0 and "${TOKEN_X}" in loaded.repo_url and "TOKEN" not in loaded.safe_url


def test_bare_yaml_off_and_direct_construction_are_checked(tmp_path):
    path = tmp_path / "watch.yaml"
    path.write_text("repositories:\n  - name: m\n    repo_url: file:///x\n    signatures: off\n")
    assert watch.load_watches(path)[0].signatures == "off"
    with pytest.raises(watch.WatchConfigError, match="policy"):
        watch.Watch(name="m", repo_url="file:///x", policy="newest")
    with pytest.raises(watch.WatchConfigError, match="allowed_signers"):
        watch.Watch(name="m", repo_url="file:///x", signatures="enforce")


def test_cli_lists_watches_and_plans_a_dry_run(remote, tmp_path):
    from tests.helpers import BIN

    config = tmp_path / "watch.yaml"
    config.write_text(f"repositories:\n  - name: models\n    repo_url: file://{remote['bare']}\n    policy: latest\n")
    shas = [push(remote, "params.yaml", f"train: {{epochs: {i}}}\n", f"epochs {i}") for i in (20, 21)]
    docs = push(remote, "README.md", "more docs\n", "docs")
    env = {**__import__("os").environ, "GITOPS_ML_WATCH_CONFIG": str(config), "GITOPS_ML_HOME": str(tmp_path / "h")}
    listed = subprocess.run(
        [str(BIN / "gitops-ml"), "watch", "list"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert listed.startswith("models") and "policy=latest" in listed
    planned = subprocess.run(
        [str(BIN / "gitops-ml"), "watch", "plan", "models", "--since", remote["head"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [line.split()[:2] for line in planned] == [[shas[0], "superseded"], [shas[1], "train"], [docs, "no_retrain"]]


@pytest.mark.parametrize(
    "entry,expected",
    [
        ("name: M\n    repo_url: file:///x", r"repositories\[0\]: field 'name' must be a name matching"),
        ("repo_url: file:///x", r"repositories\[0\]: field 'name' is missing"),
        ("name: m", r"repositories\[0\] \(m\): field 'repo_url' is missing"),
        ("name: m\n    repo_url: file:///x\n    pols: every", r"\(m\): unknown field\(s\) pols$"),
        (
            "name: m\n    repo_url: file:///x\n    poll_interval: soon",
            r"\(m\): field 'poll_interval' must be a positive number of seconds, got 'soon'",
        ),
        (
            "name: m\n    repo_url: file:///x\n    sensor_timeout: 0",
            r"\(m\): field 'sensor_timeout' must be a positive",
        ),
        (
            "name: m\n    repo_url: file:///x\n    paths: '*.dvc'",
            r"\(m\): field 'paths' must be a list of glob patterns",
        ),
        (
            "name: m\n    repo_url: file:///x\n    signatures: strict",
            r"\(m\): field 'signatures' must be off, warn or enforce",
        ),
    ],
)
def test_every_field_error_names_the_entry_and_the_field(tmp_path, entry, expected):
    path = tmp_path / "watch.yaml"
    path.write_text(f"repositories:\n  - {entry}\n")
    with pytest.raises(watch.WatchConfigError, match=expected) as info:
        watch.load_watches(path)
    assert str(info.value).startswith(f"{path}: repositories[0]")
