"""The test smart-HTTP Git server: ls-remote, clone, fetch and push through ``git http-backend``, with Basic auth."""

import os
import subprocess

import pytest

from tests.git_http import GitHttpServer
from tests.helpers import commit_file, git

pytestmark = pytest.mark.integration

# Never prompt, and no user/system config (credential helpers) that could answer for git.
ENV = {
    **os.environ,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "SSH_ASKPASS": "",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def run_git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def served(tmp_path):
    """A bare repository ``root/demo.git`` holding one commit on ``main``, pushed over the file path."""
    root = tmp_path / "srv"
    root.mkdir()
    bare = root / "demo.git"
    subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(bare)], check=True)
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    sha = commit_file(work, "README.md", "hello\n", "First commit")
    git(work, "push", "-q", str(bare), "main")
    return {"root": root, "work": work, "sha": sha}


def test_ls_remote_without_auth(served):
    with GitHttpServer(served["root"]) as server:
        result = run_git(served["work"], "ls-remote", server.url("demo.git"), "refs/heads/main")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [served["sha"], "refs/heads/main"]
        assert server.requests >= 1
        assert "@" not in server.url("demo.git")


def test_missing_repository_is_a_clear_error(served):
    with GitHttpServer(served["root"]) as server:
        result = run_git(served["work"], "ls-remote", server.url("nope.git"))
        assert result.returncode != 0
        assert "not found" in result.stderr


def test_basic_auth(served):
    with GitHttpServer(served["root"], username="ci", password="s3cr:et/") as server:
        good = server.url("demo.git")
        assert good.startswith("http://ci:s3cr%3Aet%2F@127.0.0.1:")

        wrong = good.replace("s3cr%3Aet%2F", "wrong")
        result = run_git(served["work"], "ls-remote", wrong, "refs/heads/main")
        assert result.returncode != 0
        assert "Authentication failed" in result.stderr
        assert "wrong" not in result.stderr  # git redacts the password itself

        result = run_git(served["work"], "ls-remote", server.url("demo.git", with_credentials=False))
        assert result.returncode != 0
        assert "terminal prompts disabled" in result.stderr

        result = run_git(served["work"], "ls-remote", good, "refs/heads/main")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [served["sha"], "refs/heads/main"]


def test_clone_fetch_and_push(served, tmp_path):
    with GitHttpServer(served["root"], username="ci", password="pw") as server:
        clone = tmp_path / "clone"
        result = run_git(tmp_path, "clone", "-q", server.url("demo.git"), str(clone))
        assert result.returncode == 0, result.stderr
        assert (clone / "README.md").read_text() == "hello\n"
        assert git(clone, "rev-parse", "HEAD") == served["sha"]

        # A new commit pushed over HTTP...
        new_sha = commit_file(clone, "more.txt", "more\n", "Second commit")
        result = run_git(clone, "push", "-q", "origin", "main")
        assert result.returncode == 0, result.stderr
        assert git(served["root"] / "demo.git", "rev-parse", "main") == new_sha

        # ...is fetched over HTTP by the first work tree.
        result = run_git(served["work"], "fetch", "-q", server.url("demo.git"), "main")
        assert result.returncode == 0, result.stderr
        assert git(served["work"], "rev-parse", "FETCH_HEAD") == new_sha
        assert "Authentication failed" not in result.stderr
    # Stopped at context exit: the port no longer answers.
    result = run_git(tmp_path, "ls-remote", server.url("demo.git"))
    assert result.returncode != 0
