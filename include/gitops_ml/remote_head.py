"""The head of a branch on a Git remote, asked with ``git ls-remote``: no clone, no fetch, one small request.

Used by the commit sensor and its trigger (``gitops_ml.airflow.git_sensor``, blocking and asyncio
forms) and by ``gitops-ml doctor``.  ``repo_url`` may hold credentials or ``${VAR}`` references:
git gets them through its environment (``gitops_ml.git_auth``), never on its command line, and an
error names the URL without them.  No GitPython and no Airflow import: the triggerer, the DAG
files and the CLI load it cheaply.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

from gitops_ml import git_auth
from gitops_ml.refs import redact, redact_url

__all__ = ["GitRemoteError", "ahead_of", "head_of"]


class GitRemoteError(Exception):
    """``git ls-remote`` failed (unreachable remote, refused credentials, timeout)."""


def _ls_remote(url: str, branch: str) -> tuple[list[str], dict[str, str]]:
    """argv (URL without credentials) and environment (credential helper) of ``git ls-remote``."""
    safe, env = git_auth.git_command(url)
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "",
            "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
        }
    )
    return ["git", "ls-remote", "--", safe, f"refs/heads/{branch}"], env


def _parse_head(output: str, branch: str) -> str | None:
    for line in output.splitlines():
        sha, _, ref = line.partition("\t")
        if ref.strip() == f"refs/heads/{branch}":
            return sha.strip()
    return None


def _failure(url: str, env: dict[str, str], returncode: int | None, stderr: str) -> GitRemoteError:
    detail = redact(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}")
    password = env.get(git_auth.PASSWORD_ENV)
    if password:
        detail = detail.replace(password, "***")
    return GitRemoteError(f"git ls-remote {redact_url(url)} failed: {detail}")


def head_of(repo_url: str, branch: str, timeout: float = 30.0) -> str | None:
    """The SHA at the head of ``branch`` on the remote (None: no such branch); blocking.

    ``repo_url`` may hold credentials or ``${VAR}``: git gets them through its environment.
    """
    url = os.path.expandvars(repo_url)
    argv, env = _ls_remote(url, branch)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        raise GitRemoteError(f"git ls-remote {redact_url(url)} timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise _failure(url, env, done.returncode, done.stderr)
    return _parse_head(done.stdout, branch)


async def ahead_of(repo_url: str, branch: str, timeout: float = 30.0) -> str | None:
    """``head_of`` for the triggerer's event loop (an asyncio subprocess, never blocking the loop)."""
    url = os.path.expandvars(repo_url)
    argv, env = _ls_remote(url, branch)
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise GitRemoteError(f"git ls-remote {redact_url(url)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise _failure(url, env, proc.returncode, stderr.decode(errors="replace"))
    return _parse_head(stdout.decode(errors="replace"), branch)
