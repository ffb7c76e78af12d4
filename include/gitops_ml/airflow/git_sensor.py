"""A deferrable sensor that waits for a new commit on a branch of a Git remote.

``GitCommitSensor`` defers to ``GitCommitTrigger``, which runs in the Airflow triggerer:
every ``poll_interval`` seconds it asks the remote for the branch head with
``git ls-remote`` (no clone, no fetch: one small request), so a waiting sensor holds no
worker slot.  With ``deferrable=False`` the same check runs in poke mode (the baseline).

An unreachable remote is not an error: the trigger logs a warning each interval (URL
without credentials) and keeps waiting until the sensor's ``timeout``.  The branch name
is validated before any git call; the repository URL may hold ``${VAR}`` references,
expanded only when git runs, so a token never lands in the serialized trigger.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import timedelta
from typing import Any, AsyncIterator

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.triggers.base import BaseTrigger, TriggerEvent

from gitops_ml.refs import redact, redact_url, validate_branch, validate_repo_url


class GitRemoteError(Exception):
    """``git ls-remote`` failed (unreachable remote, refused credentials, timeout)."""


def _ls_remote_argv(repo_url: str, branch: str) -> list[str]:
    return ["git", "ls-remote", "--", os.path.expandvars(repo_url), f"refs/heads/{branch}"]


def _git_env() -> dict[str, str]:
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "",
            "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")}


def _parse_head(output: str, branch: str) -> str | None:
    for line in output.splitlines():
        sha, _, ref = line.partition("\t")
        if ref.strip() == f"refs/heads/{branch}":
            return sha.strip()
    return None


def _failure(repo_url: str, returncode: int | None, stderr: str) -> GitRemoteError:
    detail = redact(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}")
    return GitRemoteError(f"git ls-remote {redact_url(os.path.expandvars(repo_url))} failed: {detail}")


def head_of(repo_url: str, branch: str, timeout: float = 30.0) -> str | None:
    """The SHA at the head of ``branch`` on the remote (None: no such branch); blocking."""
    try:
        done = subprocess.run(_ls_remote_argv(repo_url, branch), capture_output=True, text=True,
                              timeout=timeout, env=_git_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GitRemoteError(f"git ls-remote {redact_url(os.path.expandvars(repo_url))} timed out "
                             f"after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise _failure(repo_url, done.returncode, done.stderr)
    return _parse_head(done.stdout, branch)


async def ahead_of(repo_url: str, branch: str, timeout: float = 30.0) -> str | None:
    """``head_of`` for the triggerer's event loop (an asyncio subprocess, never blocking the loop)."""
    proc = await asyncio.create_subprocess_exec(*_ls_remote_argv(repo_url, branch), env=_git_env(),
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise GitRemoteError(f"git ls-remote {redact_url(os.path.expandvars(repo_url))} timed out "
                             f"after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise _failure(repo_url, proc.returncode, stderr.decode(errors="replace"))
    return _parse_head(stdout.decode(errors="replace"), branch)


class GitCommitTrigger(BaseTrigger):
    """Fires once the head of ``branch`` differs from ``since_sha``.

    :param repo_url: remote URL (``${VAR}`` expanded at each check, so secrets stay in the environment).
    :param branch: branch to watch (validated: no option-like or malformed names).
    :param since_sha: the last head already handled; empty fires with the current head at once.
    :param poll_interval: seconds between two ``git ls-remote`` calls.
    :param ls_remote_timeout: seconds one ``git ls-remote`` may take.
    """

    def __init__(self, repo_url: str, branch: str, since_sha: str = "", poll_interval: float = 30.0,
                 ls_remote_timeout: float = 30.0):
        super().__init__()
        self.repo_url = validate_repo_url(repo_url)
        self.branch = validate_branch(branch)
        self.since_sha = since_sha or ""
        self.poll_interval = float(poll_interval)
        self.ls_remote_timeout = float(ls_remote_timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"repo_url": self.repo_url, "branch": self.branch, "since_sha": self.since_sha,
                 "poll_interval": self.poll_interval, "ls_remote_timeout": self.ls_remote_timeout})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        safe_url = redact_url(os.path.expandvars(self.repo_url))
        while True:
            try:
                head = await ahead_of(self.repo_url, self.branch, self.ls_remote_timeout)
            except GitRemoteError as exc:
                self.log.warning("%s; still waiting, next check in %g s", exc, self.poll_interval)
            else:
                if head is None:
                    self.log.warning("branch %r not found on %s; still waiting", self.branch, safe_url)
                elif head != self.since_sha:
                    self.log.info("branch %r of %s moved: %s -> %s", self.branch, safe_url,
                                  self.since_sha or "(none)", head)
                    yield TriggerEvent({"status": "new_commit", "head_sha": head,
                                        "previous_sha": self.since_sha or None})
                    return
            await asyncio.sleep(self.poll_interval)


class GitCommitSensor(BaseSensorOperator):
    """Waits for a commit on ``branch`` of ``repo_url`` other than ``since_sha``; returns
    ``{"repo_url", "branch", "previous_sha", "head_sha", "new_shas"}`` (``new_shas``: the commits
    between the two heads, oldest first, when ``mirror_dir`` is given; else just the head).

    :param repo_url: remote URL (may hold ``${VAR}``; never logged with credentials).
    :param branch: branch to watch.
    :param since_sha: last head already handled (templated; empty: the current head counts as new).
    :param poll_interval: seconds between checks (trigger interval, or poke interval in poke mode).
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot.
    :param mirror_dir: folder of bare mirrors used to list the new commits (optional).
    :param ls_remote_timeout: seconds one ``git ls-remote`` may take.
    """

    template_fields = ("repo_url", "branch", "since_sha")

    def __init__(self, *, repo_url: str, branch: str = "main", since_sha: str = "", poll_interval: float = 30.0,
                 deferrable: bool = True, mirror_dir: str | None = None, ls_remote_timeout: float = 30.0,
                 **kwargs: Any):
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        self.repo_url = repo_url
        self.branch = branch
        self.since_sha = since_sha
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.mirror_dir = mirror_dir
        self.ls_remote_timeout = ls_remote_timeout

    def _validate(self) -> None:
        validate_repo_url(self.repo_url)
        validate_branch(self.branch)

    def _result(self, head_sha: str) -> dict[str, Any]:
        new_shas = [head_sha]
        if self.mirror_dir:
            from gitops_ml import source, watch  # noqa: PLC0415

            repo = source.fetch_mirror(os.path.expandvars(self.repo_url), self.branch, self.mirror_dir)
            new_shas, _ = watch.new_commits(repo, self.since_sha or None, head_sha)
        return {"repo_url": redact_url(os.path.expandvars(self.repo_url)), "branch": self.branch,
                "previous_sha": self.since_sha or None, "head_sha": head_sha, "new_shas": new_shas}

    def poke(self, context) -> PokeReturnValue | bool:
        self._validate()
        try:
            head = head_of(self.repo_url, self.branch, self.ls_remote_timeout)
        except GitRemoteError as exc:
            self.log.warning("%s; still waiting", exc)
            return False
        if head is None or head == (self.since_sha or None):
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._result(head))

    def execute(self, context) -> Any:
        self._validate()
        if not self.deferrable:
            return super().execute(context)
        found = self.poke(context)  # one check now: no deferral when the commit is already there
        if isinstance(found, PokeReturnValue):
            return found.xcom_value
        self.defer(trigger=GitCommitTrigger(self.repo_url, self.branch, self.since_sha, self.poll_interval,
                                            self.ls_remote_timeout),
                   method_name="execute_complete", timeout=timedelta(seconds=self.timeout))

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event or event.get("status") != "new_commit":
            raise GitRemoteError(f"unexpected event from GitCommitTrigger: {event!r}")
        return self._result(event["head_sha"])
