"""Credentials of a repository URL never reach git's command line (readable by every local user
in /proc/<pid>/cmdline), yet fetch, ls-remote and the notes push work against a real smart-HTTP
server that requires them.

Every git process is observed for real: ``git`` on PATH is a wrapper that appends its argv to a
file and execs the real git, and ``GIT_TRACE`` makes every git process (``git-remote-http``,
credential helpers...) log the argv of the commands it runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat

import pytest

from gitops_ml import git_auth, source
from gitops_ml.airflow.git_sensor import GitCommitSensor, GitCommitTrigger
from gitops_ml.errors import GitopsMLError
from gitops_ml.remote_head import GitRemoteError, ahead_of, head_of
from tests.git_http import GitHttpServer
from tests.helpers import commit_file, git

pytestmark = pytest.mark.integration

PASSWORD = "tok-S3CRET:/x@y"  # ':' '/' '@' survive percent-encoding in the URL and decoding for git
USER = "bot"


@pytest.fixture
def spied_git(tmp_path, monkeypatch):
    """PATH's ``git`` records its argv (NUL-separated, one record per call); GIT_TRACE records children."""
    real = shutil.which("git")
    bindir = tmp_path / "spy-bin"
    bindir.mkdir()
    argv_log = tmp_path / "git-argv.log"
    wrapper = bindir / "git"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> "{argv_log}"\necho >> "{argv_log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    trace_log = tmp_path / "git-trace.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GIT_TRACE", str(trace_log))
    # No user/system config (credential helpers) that could answer for git instead of ours.
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)

    def logs() -> str:
        text = argv_log.read_text() if argv_log.exists() else ""
        return text + "\n" + (trace_log.read_text() if trace_log.exists() else "")

    return logs


@pytest.fixture
def remote(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    bare = root / "models.git"
    git(tmp_path, "init", "--bare", "-q", "-b", "main", str(bare))
    work = tmp_path / "work"
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    sha = commit_file(work, "params.yaml", "train: {epochs: 1}\n", "first")
    git(work, "push", "-q", str(bare), "main")
    with GitHttpServer(root, username=USER, password=PASSWORD) as server:
        yield {"server": server, "url": server.url("models.git"), "bare": bare, "work": work, "sha": sha}


def test_url_credentials_are_split_and_decoded():
    url = "https://bot:tok-S3CRET%3A%2Fx%40y@git.example.com/m.git"
    assert git_auth.split_credentials(url) == ("https://git.example.com/m.git", "bot", PASSWORD)
    assert git_auth.split_credentials("https://ghp_token@github.com/m.git") == (
        "https://github.com/m.git",
        "ghp_token",
        None,
    )
    for kept in ("ssh://git@host/m.git", "git@host:m.git", "/srv/m.git", "https://host/m.git"):
        assert git_auth.split_credentials(kept) == (kept, None, None)
    safe, env = git_auth.git_command(url, base_env={"GIT_CONFIG_COUNT": "1"})
    assert safe == "https://git.example.com/m.git" and PASSWORD not in safe
    assert env["GIT_CONFIG_COUNT"] == "3" and env["GIT_CONFIG_KEY_1"] == "credential.helper"
    assert PASSWORD not in env["GIT_CONFIG_VALUE_2"] and env[git_auth.PASSWORD_ENV] == PASSWORD


def test_fetch_and_notes_push_keep_the_token_off_every_git_command_line(remote, spied_git, tmp_path):
    assert "%3A%2Fx%40y" in remote["url"]  # the URL really carries the (encoded) token
    repo = source.fetch_mirror(remote["url"], "main", tmp_path / "cache")
    assert repo.git.rev_parse("refs/heads/main") == remote["sha"]
    commit = source.resolve_commit(remote["url"], "main", remote["sha"], tmp_path / "cache")
    assert commit.repo_url == remote["server"].url("models.git", with_credentials=False)
    source.write_note(remote["url"], remote["sha"], tmp_path / "cache", {"outcome": "deployed"}, push=True)
    assert "outcome: deployed" in git(remote["bare"], "notes", "--ref", source.NOTES_REF, "show", remote["sha"])
    logs = spied_git()
    assert "fetch" in logs and "push" in logs and "git-remote-http" in logs  # every process was observed
    for leaked in (PASSWORD, "S3CRET", "tok-S3CRET%3A%2Fx%40y"):
        assert leaked not in logs, f"{leaked!r} on a git command line"
    # Nor in what git leaves on disk in the mirror (FETCH_HEAD, config).
    mirror = source.mirror_path(remote["url"], tmp_path / "cache")
    for path in mirror.rglob("*"):
        if path.is_file() and path.stat().st_size < 1_000_000:
            assert b"S3CRET" not in path.read_bytes(), path


def test_ls_remote_of_the_sensor_and_trigger_keeps_the_token_off_the_command_line(remote, spied_git):
    assert head_of(remote["url"], "main") == remote["sha"]
    assert asyncio.run(ahead_of(remote["url"], "main")) == remote["sha"]
    sensor = GitCommitSensor(task_id="s", repo_url=remote["url"], branch="main", previous_sha="", deferrable=False)
    assert sensor.poke({}).xcom_value["repo_url"] == remote["server"].url("models.git", with_credentials=False)
    logs = spied_git()
    assert "ls-remote" in logs and "git-remote-http" in logs
    assert PASSWORD not in logs and "S3CRET" not in logs


def test_wrong_or_missing_credentials_fail_clearly_without_echoing_them(remote, spied_git, tmp_path):
    wrong = remote["url"].replace("tok-S3CRET", "tok-WR0NG")
    with pytest.raises(GitopsMLError, match="Authentication failed") as failure:
        source.fetch_mirror(wrong, "main", tmp_path / "cache")
    assert "WR0NG" not in str(failure.value) and "127.0.0.1" in str(failure.value)
    with pytest.raises(GitRemoteError) as failure:
        head_of(wrong, "main")
    assert "WR0NG" not in str(failure.value)
    with pytest.raises(GitopsMLError, match=r"terminal prompts disabled|could not read Username"):
        source.fetch_mirror(remote["server"].url("models.git", with_credentials=False), "main", tmp_path / "c2")
    assert "WR0NG" not in spied_git()


def test_a_configured_credential_helper_does_not_answer_instead_of_the_url(remote, spied_git, tmp_path, monkeypatch):
    """A helper from git's config (here: one printing wrong credentials) is reset for our calls."""
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "credential.helper")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "!f() { echo username=bot; echo password=nope; }; f")
    assert source.fetch_mirror(remote["url"], "main", tmp_path / "cache").git.rev_parse("main") == remote["sha"]
    assert head_of(remote["url"], "main") == remote["sha"]


def test_trigger_for_a_watch_stores_its_name_and_resolves_the_token_where_git_runs(
    remote, spied_git, tmp_path, monkeypatch
):
    config = tmp_path / "watch.yaml"
    config.write_text(f"repositories:\n  - name: models\n    repo_url: {remote['url']}\n    branch: main\n")
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    trigger = GitCommitTrigger(branch="main", watch="models", poll_interval=0.2)
    stored = repr(trigger.serialize())
    assert "models" in stored and "S3CRET" not in stored and "127.0.0.1" not in stored
    event = asyncio.run(asyncio.wait_for(anext(trigger.run()), 20))
    assert event.payload["head_sha"] == remote["sha"]
    # A literal URL with credentials is refused before it would be stored with the trigger...
    with pytest.raises(ValueError, match="holds credentials"):
        GitCommitTrigger(remote["url"], "main").serialize()
    # ...while a ${VAR} reference is stored as written and expanded only when git runs.
    monkeypatch.setenv("MODELS_TOKEN", PASSWORD.replace(":", "%3A").replace("/", "%2F").replace("@", "%40"))
    by_reference = f"http://{USER}:${{MODELS_TOKEN}}@127.0.0.1:{remote['server'].port}/models.git"
    stored = repr(GitCommitTrigger(by_reference, "main").serialize())
    assert "${MODELS_TOKEN}" in stored and "S3CRET" not in stored
    assert head_of(by_reference, "main") == remote["sha"]
    assert "S3CRET" not in spied_git()
