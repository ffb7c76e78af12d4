"""Which commits start a pipeline run: watched repositories, bursts, rewrites, paths, signatures.

A watched repository is configured without code, in one YAML file (``GITOPS_ML_WATCH_CONFIG``,
default ``<home>/watch.yaml``); without that file the repository of ``GITOPS_ML_REPO_URL`` is
watched under the name ``default``.  Example::

    repositories:
      - name: digits                  # DAG ids gitops_ml_watch__digits / gitops_ml_retrain__digits
        repo_url: https://oauth2:${GITLAB_TOKEN}@gitlab.example.com/ml/digits.git   # ${VAR} expanded at use
        branch: main
        policy: every                 # every: one run per commit, oldest first | latest: newest only
        paths: ["params.yaml", "*.dvc", "dvc.lock", "dvc.yaml", ".dvc/config", "src/*"]
        poll_interval: 30             # seconds between two `git ls-remote`
        sensor_timeout: 3600          # a waiting sensor gives up (skipped) and the watcher starts again
        retrain_schedule: "@weekly"   # scheduled retraining of the branch head; null: none
        signatures: off               # off | warn | enforce
        allowed_signers: /etc/gitops-ml/allowed_signers   # SSH, git's gpg.ssh.allowedSignersFile format
        gpg_keyring: /etc/gitops-ml/allowed-keys.asc      # armored public GPG keys
        webhook_secret_env: GITOPS_ML_WEBHOOK_SECRET      # env var holding the webhook secret
        model_name: digits            # registered model (default GITOPS_ML_MODEL_NAME)
        serving_url: http://serve-1:8765,http://serve-2:8765  # its model servers (default GITOPS_ML_SERVING_URL)

``plan`` turns "the branch moved from A to B" into one decision per new commit: ``train``,
``no_retrain`` (only paths the model does not depend on changed), ``superseded`` (``latest``
policy: a newer commit of the same burst trains instead) or ``rejected`` (signature policy).
A force-push that removed commits is reported in the plan, never silently ignored.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gitops_ml import refs
from gitops_ml.config import Settings
from gitops_ml.errors import InputError
from gitops_ml.runs import DEFAULT_WATCH, watch_dag_id

if TYPE_CHECKING:
    from gitops_ml.source import History

log = logging.getLogger(__name__)

POLICIES = ("every", "latest")
DEFAULT_PATHS = ("params.yaml", "*.dvc", "dvc.lock", "dvc.yaml", ".dvc/config", "src/*", "model/*")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
NAME_PATTERN = _NAME_RE.pattern
"""What a watch's name must match (it names DAG ids and run ids)."""


class WatchConfigError(InputError):
    """The watch configuration file names a bad value (the message says which repository and field)."""


class _InvalidWatch(WatchConfigError):
    """A watch built with a wrong field; ``problem`` names the field, for the file's loader to place."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.problem = problem


class Watch(BaseModel):
    """One watched branch of one repository (see the module docstring for each field).

    Built from the watch file or directly: a wrong value raises :class:`WatchConfigError`
    naming the field and what it must be.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME_RE.pattern, description=f"a name matching {_NAME_RE.pattern}")
    repo_url: str = Field(min_length=1, repr=False, description="a URL git understands")
    branch: str = Field("main", description="a branch name")
    policy: Literal["every", "latest"] = Field("every", description=f"one of {POLICIES}")
    paths: tuple[Annotated[str, Field(min_length=1)], ...] = Field(DEFAULT_PATHS, description="a list of glob patterns")
    poll_interval: float = Field(30.0, gt=0, description="a positive number of seconds")
    sensor_timeout: float = Field(3600.0, gt=0, description="a positive number of seconds")
    retrain_schedule: str | None = Field("@weekly", description="a cron expression or preset, or null")
    signatures: Literal["off", "warn", "enforce"] = Field("off", description="off, warn or enforce")
    allowed_signers: str | None = Field(None, description="a path, or null")
    gpg_keyring: str | None = Field(None, description="a path, or null")
    webhook_secret_env: str | None = Field(None, description="an environment variable name, or null")
    model_name: str | None = Field(None, description="a registered model name, or null")
    serving_url: str | None = Field(None, description="comma-separated model-server URLs, or null")

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise _InvalidWatch(f"watch {fields.get('name')!r}", _problem(exc)) from None

    @field_validator("signatures", mode="before")
    @classmethod
    def _bare_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("branch")
    @classmethod
    def _valid_branch(cls, value: str) -> str:
        try:
            return refs.validate_branch(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _signers_for_a_policy(self) -> Watch:
        if self.signatures != "off" and not (self.allowed_signers or self.gpg_keyring):
            raise ValueError(f"signatures: {self.signatures} needs 'allowed_signers' (SSH) and/or 'gpg_keyring' (GPG)")
        return self

    @property
    def url(self) -> str:
        """The URL git uses: ``${VAR}`` expanded (credentials stay out of everything we log)."""
        return os.path.expandvars(self.repo_url)

    @property
    def safe_url(self) -> str:
        return refs.redact_url(self.url)

    @property
    def cursor_key(self) -> str:
        """Airflow Variable holding the last commit the watcher has planned."""
        return f"{watch_dag_id(self.name)}__last_sha"

    def run_settings(self) -> Settings:
        """The settings of a run of this watch: the environment, with the watch's URL, branch, model name
        and model servers."""
        return Settings.from_env().with_overrides(
            repo_url=self.url, branch=self.branch, model_name=self.model_name, serving_url=self.serving_url
        )

    def webhook_secret(self) -> str:
        """The variable the watch names (``webhook_secret_env``), else ``GITOPS_ML_WEBHOOK_SECRET``."""
        if self.webhook_secret_env:
            return os.environ.get(self.webhook_secret_env, "")
        return Settings.from_env().webhook_secret.get_secret_value()

    def public(self) -> dict[str, Any]:
        """The fields that may be shown (URL without credentials)."""
        return {**self.model_dump(), "repo_url": self.safe_url, "paths": list(self.paths)}


def _problem(exc: ValidationError) -> str:
    """The first problem of a watch, named by its field: unknown fields first, then the name."""
    errors = exc.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    error = min(errors, key=lambda e: e["loc"][:1] != ("name",))
    if error["type"] == "value_error":  # a rule of ours: its message says what is wrong
        problem = str(error["ctx"]["error"])
        return f"field {error['loc'][0]!r}: {problem}" if error["loc"] else problem
    key = str(error["loc"][0])
    if error["type"] == "missing":
        return f"field {key!r} is missing"
    return f"field {key!r} must be {Watch.model_fields[key].description}, got {error['input']!r}"


def _watch_from_dict(raw: Any, where: str) -> Watch:
    """One entry of the watch file; errors say where it is (``<file>: repositories[i] (name)``)."""
    if not isinstance(raw, dict):
        raise WatchConfigError(f"{where}: each repository must be a mapping, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str) and _NAME_RE.match(raw["name"]):
        where = f"{where} ({raw['name']})"
    odd = sorted(repr(key) for key in raw if not isinstance(key, str))
    if odd:
        raise WatchConfigError(f"{where}: unknown field(s) {', '.join(odd)}")
    try:
        return Watch(**raw)
    except _InvalidWatch as exc:
        raise WatchConfigError(f"{where}: {exc.problem}") from None


def config_path() -> Path:
    return Settings.from_env().watch_config_path


def load_watches(path: Path | None = None) -> list[Watch]:
    """Every watched repository: the YAML file, else ``GITOPS_ML_REPO_URL`` as ``default``."""
    import yaml  # noqa: PLC0415

    settings = Settings.from_env()
    path = Path(path) if path else settings.watch_config_path
    if not path.is_file():
        if settings.watch_config:
            raise WatchConfigError(f"watch configuration {path} does not exist (GITOPS_ML_WATCH_CONFIG)")
        url = settings.repo_url
        return [Watch(name=DEFAULT_WATCH, repo_url=url, branch=settings.branch)] if url else []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WatchConfigError(f"watch configuration {path} is not valid YAML: {exc}") from None
    entries = data.get("repositories") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise WatchConfigError(f"watch configuration {path}: expected a top-level 'repositories' list")
    watches = [_watch_from_dict(entry, f"{path}: repositories[{i}]") for i, entry in enumerate(entries)]
    names = [w.name for w in watches]
    if len(set(names)) != len(names):
        raise WatchConfigError(f"watch configuration {path}: repository names must be unique, got {names}")
    return watches


def get_watch(name: str, path: Path | None = None) -> Watch:
    for watch in load_watches(path):
        if watch.name == name:
            return watch
    raise WatchConfigError(f"no watched repository named {name!r} in {path or config_path()}")


def policy_for(repo_url: str, branch: str, watch_name: str | None = None, path: Path | None = None) -> Watch | None:
    """The watched repository whose rules (signature policy) apply to a run of ``repo_url``/``branch``.

    The watch named in the run conf, else the one with the same URL (without credentials) and
    branch.  A repository nobody watches has no policy, unless some watch enforces signatures:
    then an unwatched repository is refused, so a run conf cannot point around the policy.
    """
    watches = load_watches(path)
    if watch_name:
        return get_watch(watch_name, path)
    safe = refs.redact_url(repo_url)
    for watch in watches:
        if watch.safe_url == safe and watch.branch == branch:
            return watch
    enforcing = [w.name for w in watches if w.signatures == "enforce"]
    if enforcing:
        raise WatchConfigError(
            f"repository {safe} (branch {branch!r}) is not watched, and watch(es) "
            f"{', '.join(enforcing)} enforce commit signatures: only watched repositories "
            "can be built (add it to the watch configuration)"
        )
    return None


def signature_verdict(watch: Watch, git_dir: Path, commit_sha: str, cache: Path | None = None):
    """Apply ``watch``'s signature policy to one commit of the repository at ``git_dir``
    (a :class:`gitops_ml.signatures.SignatureDecision`: accept, warn or reject, with the reason)."""
    from gitops_ml import signatures  # noqa: PLC0415

    check = None
    if watch.signatures != "off":
        check = signatures.verify_commit(
            Path(git_dir),
            commit_sha,
            allowed_signers=Path(watch.allowed_signers) if watch.allowed_signers else None,
            gpg_keyring=Path(watch.gpg_keyring) if watch.gpg_keyring else None,
            gnupg_home_cache=cache,
        )
    return signatures.decide(watch.signatures, check)


@dataclass(frozen=True)
class Decision:
    """What happens to one new commit."""

    commit_sha: str
    action: str  # train | no_retrain | superseded | rejected
    reason: str
    changed_paths: tuple[str, ...] = ()
    superseded_by: str | None = None
    warning: str | None = None  # signature policy "warn"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed_paths": list(self.changed_paths)}


@dataclass(frozen=True)
class Plan:
    watch: str
    branch: str
    previous_sha: str | None
    head_sha: str
    decisions: tuple[Decision, ...]
    force_push: dict[str, Any] | None = None  # {"removed": [...], "merge_base": sha | None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "watch": self.watch,
            "branch": self.branch,
            "previous_sha": self.previous_sha,
            "head_sha": self.head_sha,
            "decisions": [d.to_dict() for d in self.decisions],
            "force_push": self.force_push,
        }


def changed_paths(history: History, commit_sha: str) -> tuple[str, ...]:
    """Paths a commit changed against its first parent (every path for a root commit)."""
    return history.changed_paths(commit_sha)


def relevant(paths: tuple[str, ...], patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The paths matching a pattern (``fnmatch``; ``*`` also crosses ``/``; a bare name matches at any depth)."""
    hits = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(path, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)) for p in patterns):
            hits.append(path)
    return tuple(hits)


def new_commits(history: History, previous_sha: str | None, head_sha: str) -> tuple[list[str], dict[str, Any] | None]:
    """Commits that landed on the branch between ``previous_sha`` and ``head_sha``, oldest first.

    The first time (no previous SHA) only the head counts. When ``previous_sha`` is no longer an
    ancestor of the head, the branch was rewritten: the removed commits are returned too.
    """
    if not previous_sha:
        return [head_sha], None
    if previous_sha == head_sha:
        return [], None
    if not history.exists(previous_sha):
        return [head_sha], {
            "removed": [previous_sha],
            "merge_base": None,
            "note": "the previous head is no longer known to the mirror",
        }
    if history.is_ancestor(previous_sha, head_sha):
        return history.first_parent(f"{previous_sha}..{head_sha}", oldest_first=True), None
    base = history.merge_base(previous_sha, head_sha)
    removed = history.first_parent(f"{head_sha}..{previous_sha}")
    added = history.first_parent(f"{base}..{head_sha}", oldest_first=True) if base else [head_sha]
    return added, {"removed": removed, "merge_base": base}


def plan(
    watch: Watch, history: History, previous_sha: str | None, head_sha: str, signature_cache: Path | None = None
) -> Plan:
    """Decide, for every commit between ``previous_sha`` and ``head_sha``, what happens to it."""
    commits, force_push = new_commits(history, previous_sha, head_sha)
    if force_push:
        log.warning(
            "force-push on branch %r of %s: %d commit(s) removed from the branch (%s); new head %s",
            watch.branch,
            watch.safe_url,
            len(force_push["removed"]),
            ", ".join(sha[:12] for sha in force_push["removed"][:10]),
            head_sha,
        )
    draft: list[Decision] = []
    for commit_sha in commits:
        paths = changed_paths(history, commit_sha)
        warning = None
        if watch.signatures != "off":
            verdict = signature_verdict(watch, history.git_dir, commit_sha, signature_cache)
            if verdict.action == "reject":
                draft.append(Decision(commit_sha, "rejected", f"signature policy enforce: {verdict.message}", paths))
                continue
            warning = verdict.message if verdict.action == "warn" else None
        hits = relevant(paths, watch.paths)
        if previous_sha is None or hits:
            why = f"changed {', '.join(hits[:5])}" if hits else "first commit seen on the branch"
            draft.append(Decision(commit_sha, "train", why, paths, warning=warning))
        else:
            draft.append(
                Decision(
                    commit_sha,
                    "no_retrain",
                    f"no retrain needed: changed only {', '.join(paths[:5]) or 'nothing'} "
                    f"(model inputs: {', '.join(watch.paths)})",
                    paths,
                    warning=warning,
                )
            )
    if watch.policy == "latest":
        trains = [d for d in draft if d.action == "train"]
        if len(trains) > 1:
            newest = trains[-1].commit_sha
            draft = [
                Decision(
                    d.commit_sha,
                    "superseded",
                    f"superseded by {newest} (policy latest)",
                    d.changed_paths,
                    superseded_by=newest,
                    warning=d.warning,
                )
                if d.action == "train" and d.commit_sha != newest
                else d
                for d in draft
            ]
    return Plan(watch.name, watch.branch, previous_sha, head_sha, tuple(draft), force_push)


def plan_branch(watch: Watch, cache_dir: Path, previous_sha: str | None, head_sha: str | None = None) -> Plan:
    """Fetch the mirror of the watched repository and plan from ``previous_sha`` to the head."""
    from gitops_ml import source  # noqa: PLC0415

    history = source.history(watch.url, watch.branch, cache_dir)
    head = head_sha or history.head(watch.branch)
    if head_sha and not history.exists(head_sha):
        raise InputError(f"commit {head_sha} is not in {watch.safe_url} (branch {watch.branch!r})")
    return plan(watch, history, previous_sha, head, signature_cache=Path(cache_dir) / "gnupg")
