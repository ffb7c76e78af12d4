"""A deferrable sensor that waits for a new commit on a branch of a Git remote.

``GitCommitSensor`` defers to ``GitCommitTrigger``, which runs in the Airflow triggerer:
every ``poll_interval`` seconds it asks the remote for the branch head with
``git ls-remote`` (``gitops_ml.remote_head``) (no clone, no fetch: one small request), so a waiting sensor holds no
worker slot.  With ``deferrable=False`` the same check runs in poke mode (the baseline).

An unreachable remote is not an error: the trigger logs a warning each interval (URL
without credentials) and keeps waiting until the sensor's ``timeout``.  The branch name
is validated before any git call.

Credentials never reach the Airflow DB, the UI or a process list: the sensor and its
trigger are given the *name* of a watched repository (``watch=``, see ``gitops_ml.watch``)
and look its URL up only in the process that runs git (worker or triggerer); a literal
``repo_url`` may hold ``${VAR}`` references (expanded only when git runs) but is refused
before it would be stored with credentials in it.  ``repo_url`` is not a template field, so
nothing of it is rendered.  git gets the credentials through its environment
(``gitops_ml.git_auth``), never on its command line.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.triggers.base import BaseTrigger, TriggerEvent

from gitops_ml import git_auth
from gitops_ml.refs import redact_url, validate_branch, validate_repo_url
from gitops_ml.remote_head import GitRemoteError, ahead_of, head_of


def literal_credentials(repo_url: str) -> bool:
    """True when ``repo_url`` holds a secret written out rather than as a ``${VAR}`` reference: the
    password, or a user name given alone (a token used as user name, ``https://<token>@host``)."""
    _, user, password = git_auth.split_credentials(repo_url)
    secret = password if password is not None else user
    return secret is not None and secret != "" and "$" not in secret


def _refuse_stored_credentials(repo_url: str, where: str) -> None:
    if literal_credentials(repo_url):
        raise ValueError(
            f"{where}: the repository URL {redact_url(repo_url)} holds credentials, which would be "
            "stored in the Airflow DB; pass watch=<name> (a watched repository) or write them "
            "as ${VAR} references to environment variables"
        )


def _resolve_url(watch_name: str | None, repo_url: str) -> str:
    """The URL git uses, credentials included: the watch's URL, else ``repo_url`` with ``${VAR}`` expanded."""
    if watch_name:
        from gitops_ml.watch import get_watch

        return get_watch(watch_name).url
    return os.path.expandvars(repo_url)


class GitCommitTrigger(BaseTrigger):
    """Fires once the head of ``branch`` differs from ``previous_sha``.

    :param repo_url: remote URL when no ``watch`` is given (``${VAR}`` expanded at each check;
        refused when written out with credentials, since the trigger's arguments are stored in the DB).
    :param branch: branch to watch (validated: no option-like or malformed names).
    :param previous_sha: the last head already handled; empty fires with the current head at once.
    :param poll_interval: seconds between two ``git ls-remote`` calls.
    :param ls_remote_timeout: seconds one ``git ls-remote`` may take.
    :param watch: name of a watched repository (``gitops_ml.watch``): its URL, credentials included,
        is looked up in the triggerer only; the stored arguments hold the name.
    """

    def __init__(
        self,
        repo_url: str = "",
        branch: str = "main",
        previous_sha: str = "",
        poll_interval: float = 30.0,
        ls_remote_timeout: float = 30.0,
        watch: str | None = None,
    ):
        super().__init__()
        self.watch = watch or None
        self.repo_url = repo_url if watch else validate_repo_url(repo_url)
        self.branch = validate_branch(branch)
        self.previous_sha = previous_sha or ""
        self.poll_interval = float(poll_interval)
        self.ls_remote_timeout = float(ls_remote_timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _refuse_stored_credentials(self.repo_url, "GitCommitTrigger")
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "repo_url": self.repo_url,
                "branch": self.branch,
                "previous_sha": self.previous_sha,
                "poll_interval": self.poll_interval,
                "ls_remote_timeout": self.ls_remote_timeout,
                "watch": self.watch,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        url = await asyncio.to_thread(_resolve_url, self.watch, self.repo_url)  # reads the watch file
        safe_url = redact_url(url)
        while True:
            try:
                head = await ahead_of(url, self.branch, self.ls_remote_timeout)
            except GitRemoteError as exc:
                self.log.warning("%s; still waiting, next check in %g s", exc, self.poll_interval)
            else:
                if head is None:
                    self.log.warning("branch %r not found on %s; still waiting", self.branch, safe_url)
                elif head != self.previous_sha:
                    self.log.info(
                        "branch %r of %s moved: %s -> %s", self.branch, safe_url, self.previous_sha or "(none)", head
                    )
                    yield TriggerEvent(
                        {"status": "new_commit", "head_sha": head, "previous_sha": self.previous_sha or None}
                    )
                    return
            await asyncio.sleep(self.poll_interval)


class GitCommitSensor(BaseSensorOperator):
    """Waits for a commit on ``branch`` of a repository other than ``previous_sha``; returns
    ``{"repo_url", "branch", "previous_sha", "head_sha", "new_shas"}`` (``repo_url`` without
    credentials; ``new_shas``: the commits between the two heads, oldest first, when
    ``mirror_dir`` is given; else just the head).

    :param watch: name of a watched repository (``gitops_ml.watch``); its URL, credentials included,
        is looked up only where git runs, so nothing secret is stored or rendered.  Preferred.
    :param repo_url: remote URL when no ``watch`` is given (may hold ``${VAR}``; never logged with
        credentials; not a template field).  Credentials written out in it work in poke mode, but
        deferring refuses them (they would be stored with the trigger).
    :param branch: branch to watch.
    :param previous_sha: last head already handled (templated; empty: the current head counts as new).
    :param poll_interval: seconds between checks (trigger interval, or poke interval in poke mode).
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot.
    :param mirror_dir: folder of bare mirrors used to list the new commits (optional).
    :param ls_remote_timeout: seconds one ``git ls-remote`` may take.
    """

    template_fields = ("branch", "previous_sha")

    def __init__(
        self,
        *,
        watch: str | None = None,
        repo_url: str = "",
        branch: str = "main",
        previous_sha: str = "",
        poll_interval: float = 30.0,
        deferrable: bool = True,
        mirror_dir: str | None = None,
        ls_remote_timeout: float = 30.0,
        **kwargs: Any,
    ):
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        if not watch and not repo_url:
            raise ValueError("GitCommitSensor needs watch=<name of a watched repository> or repo_url")
        self.watch = watch or None
        self.repo_url = repo_url
        self.branch = branch
        self.previous_sha = previous_sha
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.mirror_dir = mirror_dir
        self.ls_remote_timeout = ls_remote_timeout

    def _url(self) -> str:
        """The URL with its credentials: only ever passed to git (through ``gitops_ml.git_auth``)."""
        return _resolve_url(self.watch, self.repo_url)

    def _validate(self) -> None:
        if not self.watch:
            validate_repo_url(self.repo_url)
        validate_branch(self.branch)

    def _result(self, head_sha: str) -> dict[str, Any]:
        new_shas = [head_sha]
        url = self._url()
        if self.mirror_dir:
            from gitops_ml import source, watch

            new_shas, _ = watch.new_commits(
                source.history(url, self.branch, Path(self.mirror_dir)), self.previous_sha or None, head_sha
            )
        return {
            "repo_url": redact_url(url),
            "branch": self.branch,
            "previous_sha": self.previous_sha or None,
            "head_sha": head_sha,
            "new_shas": new_shas,
        }

    def poke(self, context) -> PokeReturnValue | bool:
        self._validate()
        try:
            head = head_of(self._url(), self.branch, self.ls_remote_timeout)
        except GitRemoteError as exc:
            self.log.warning("%s; still waiting", exc)
            return False
        if head is None or head == (self.previous_sha or None):
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._result(head))

    def execute(self, context) -> Any:
        self._validate()
        if not self.deferrable:
            return super().execute(context)
        if not self.watch:
            _refuse_stored_credentials(self.repo_url, f"task {self.task_id}")
        found = self.poke(context)  # one check now: no deferral when the commit is already there
        if isinstance(found, PokeReturnValue):
            return found.xcom_value
        self.defer(
            trigger=GitCommitTrigger(
                "" if self.watch else self.repo_url,
                self.branch,
                self.previous_sha,
                self.poll_interval,
                self.ls_remote_timeout,
                watch=self.watch,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event or event.get("status") != "new_commit":
            raise GitRemoteError(f"unexpected event from GitCommitTrigger: {event!r}")
        return self._result(event["head_sha"])
