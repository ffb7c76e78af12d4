"""Helpers shared by the tests and the benchmarks, free of side effects on import (unlike ``conftest``,
which sets Airflow's environment): a free loopback port, git with a fixed identity, one-file commits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's scripts: gitops-ml, airflow, dvc

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    """Run ``git args`` in ``cwd`` with a fixed author and committer; its stripped stdout (raises on failure)."""
    return subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_file(repo: Path, relpath: str, text: str, message: str) -> str:
    """Write ``relpath`` in ``repo``, commit it on the current branch, return the new SHA."""
    (repo / relpath).write_text(text)
    git(repo, "add", relpath)
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")
