"""Git: resolve a commit on a tracked branch and check it out in an isolated work tree.

Each repository is mirrored once as a bare repository under the git cache and
fetched before every resolve; every SHA gets its own detached work tree, so two
runs never share a checkout.  Credentials inside a remote URL are used by git
but never appear in a returned value, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import git

from gitops_ml import git_auth
from gitops_ml.errors import CommitNotFound, CommitNotOnBranch, GitopsMLError, InvalidRef
from gitops_ml.payloads import Commit
from gitops_ml.refs import redact, redact_url, validate_branch, validate_repo_url, validate_sha

log = logging.getLogger(__name__)


def _git_error(action: str, exc: git.GitCommandError, secrets: tuple[str | None, ...] = ()) -> GitopsMLError:
    """A one-line error from git's stderr: URL credentials masked, and ``secrets`` (the password
    handed to git through its environment) removed should git ever echo it."""
    stderr = redact(str(exc.stderr or "").strip())
    for secret in secrets:
        if secret:
            stderr = stderr.replace(secret, "***")
    return GitopsMLError(f"git failed to {action}: {stderr or 'exit status ' + str(exc.status)}")


def mirror_path(repo_url: str, cache_dir: Path) -> Path:
    """Deterministic location of the bare mirror of ``repo_url`` (credentials do not change it)."""
    key = hashlib.sha256(redact_url(repo_url).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key}.git"


def fetch_mirror(repo_url: str, branch: str, cache_dir: Path) -> git.Repo:
    """Create or update the bare mirror of ``repo_url`` with the head of ``branch``."""
    validate_repo_url(repo_url)
    validate_branch(branch)
    path = mirror_path(repo_url, cache_dir)
    repo = git.Repo(path) if (path / "HEAD").exists() else git.Repo.init(path, bare=True, mkdir=True)
    # Credentials reach git through its environment (a credential helper), never its argv.
    url, env = git_auth.git_env_overrides(repo_url)
    try:
        # All branches, so that a SHA of another branch is told apart from one that does not exist.
        repo.git.fetch("--quiet", "--no-tags", "--prune", "--", url, "+refs/heads/*:refs/heads/*", env=env)
    except git.GitCommandError as exc:
        raise _git_error(
            f"fetch branch {branch!r} from {redact_url(repo_url)}", exc, (env.get(git_auth.PASSWORD_ENV),)
        ) from None
    try:
        repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}")
    except git.GitCommandError:
        raise InvalidRef(f"branch {branch!r} does not exist in {redact_url(repo_url)}") from None
    return repo


def resolve_commit(repo_url: str, branch: str, commit_sha: str | None, cache_dir: Path) -> Commit:
    """Fetch ``branch`` and return the commit ``commit_sha`` (default: the branch head).

    Raises ``CommitNotFound`` when the SHA does not exist and ``CommitNotOnBranch``
    when it exists but is not reachable from the branch.
    """
    if commit_sha is not None:
        commit_sha = validate_sha(commit_sha)
    repo = fetch_mirror(repo_url, branch, cache_dir)
    safe_url = redact_url(repo_url)
    wanted = commit_sha or f"refs/heads/{branch}"
    try:
        full_sha = repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{wanted}^{{commit}}")
    except git.GitCommandError:
        raise CommitNotFound(f"commit {commit_sha} does not exist in {safe_url} (fetched branch {branch!r})") from None
    if commit_sha and not repo.is_ancestor(full_sha, f"refs/heads/{branch}"):  # type: ignore[arg-type]  # revisions
        raise CommitNotOnBranch(f"commit {full_sha} is not on branch {branch!r} of {safe_url}")
    commit = repo.commit(full_sha)
    return Commit(
        repo_url=safe_url,
        branch=branch,
        commit_sha=full_sha,
        # GitPython gives bytes only for a message it could not decode.
        message=(m if isinstance(m := commit.message, str) else m.decode("utf-8", "replace")).strip(),
        author=f"{commit.author.name} <{commit.author.email}>",
        committed_at=commit.committed_datetime.isoformat(),
    )


def checkout(repo_url: str, commit_sha: str, cache_dir: Path, work_dir: Path) -> Path:
    """Check ``commit_sha`` out, detached, in its own work tree ``work_dir/<sha>``; idempotent.

    The mirror must hold the commit already (``resolve_commit`` fetched it).
    """
    repo = git.Repo(mirror_path(repo_url, cache_dir))
    dest = Path(work_dir) / commit_sha
    if dest.exists():
        try:
            if git.Repo(dest).head.commit.hexsha == commit_sha:
                git.Repo(dest).git.reset("--hard", "--quiet")
                return dest
        except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
            pass
        shutil.rmtree(dest)
    repo.git.worktree("prune")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        repo.git.worktree("add", "--detach", "--force", "--", str(dest), commit_sha)
    except git.GitCommandError as exc:
        raise _git_error(f"check out commit {commit_sha}", exc) from None
    log.info("checked out commit %s in %s", commit_sha, dest)
    return dest


NOTES_REF = "refs/notes/gitops-ml"
_NOTE_IDENTITY = {
    "GIT_AUTHOR_NAME": "gitops-ml",
    "GIT_AUTHOR_EMAIL": "gitops-ml@localhost",
    "GIT_COMMITTER_NAME": "gitops-ml",
    "GIT_COMMITTER_EMAIL": "gitops-ml@localhost",
}


def write_note(repo_url: str, commit_sha: str, cache_dir: Path, outcome: dict, push: bool = False) -> str:
    """Attach ``outcome`` (as YAML) to the commit under ``refs/notes/gitops-ml``; push it when asked.

    The note replaces an earlier one of the same commit (the full history is in the deploy
    records and MLflow tags).  With ``push``, the notes ref is fetched first so the push is
    a fast-forward.
    """
    import yaml  # noqa: PLC0415

    repo = git.Repo(mirror_path(repo_url, cache_dir))
    text = yaml.safe_dump(outcome, sort_keys=False, default_flow_style=False)
    url, env = git_auth.git_env_overrides(repo_url)  # credentials in git's environment, not its argv
    with repo.git.custom_environment(**_NOTE_IDENTITY):
        if push:
            try:
                repo.git.fetch("--quiet", "--", url, f"+{NOTES_REF}:{NOTES_REF}", env=env)
            except git.GitCommandError:
                pass  # the remote has no notes yet
        repo.git.notes("--ref", NOTES_REF, "add", "--force", "--message", text, commit_sha)
        if push:
            try:
                repo.git.push("--quiet", "--", url, f"{NOTES_REF}:{NOTES_REF}", env=env)
            except git.GitCommandError as exc:
                raise _git_error(
                    f"push the note of {commit_sha} to {redact_url(repo_url)}", exc, (env.get(git_auth.PASSWORD_ENV),)
                ) from None
    return text


def read_note(repo_url: str, commit_sha: str, cache_dir: Path) -> str | None:
    path = mirror_path(repo_url, cache_dir)
    if not (path / "HEAD").exists():
        return None
    try:
        return git.Repo(path).git.notes("--ref", NOTES_REF, "show", commit_sha)
    except git.GitCommandError:
        return None


def newer_on_branch(repo_url: str, branch: str, cache_dir: Path, commit_sha: str, other_sha: str) -> bool:
    """True when ``other_sha`` is on ``branch`` (after a fetch) and ``commit_sha`` is a strict ancestor
    of it: ``other_sha`` is the newer revision of the branch.  A commit that a force-push removed
    from the branch is never newer."""
    commit_sha, other_sha = validate_sha(commit_sha), validate_sha(other_sha)
    if commit_sha == other_sha:
        return False
    repo = fetch_mirror(repo_url, branch, cache_dir)
    try:
        on_branch = repo.is_ancestor(other_sha, f"refs/heads/{branch}")  # type: ignore[arg-type]  # revisions
        return on_branch and repo.is_ancestor(commit_sha, other_sha)  # type: ignore[arg-type]
    except git.GitCommandError:  # other_sha unknown to this mirror
        return False


class History:
    """Read-only questions about the history of a fetched mirror (what the watcher plans from).

    Returned by :func:`history`; callers never see GitPython objects.
    """

    def __init__(self, repo: git.Repo):
        self._repo = repo
        self.git_dir = Path(repo.git_dir)

    def head(self, branch: str) -> str:
        return self._repo.git.rev_parse(f"refs/heads/{validate_branch(branch)}")

    def exists(self, commit_sha: str) -> bool:
        try:
            self._repo.git.cat_file("-e", f"{commit_sha}^{{commit}}")
            return True
        except git.GitCommandError:
            return False

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self._repo.is_ancestor(ancestor, descendant)  # type: ignore[arg-type]  # revisions, as git takes them

    def merge_base(self, first: str, second: str) -> str | None:
        bases = self._repo.merge_base(first, second)
        return bases[0].hexsha if bases else None

    def first_parent(self, revision_range: str, oldest_first: bool = False) -> list[str]:
        """SHAs of ``revision_range`` (``a..b``) along first parents, newest first unless ``oldest_first``."""
        args = ["--reverse"] if oldest_first else []
        out = self._repo.git.rev_list(*args, "--first-parent", revision_range)
        return [line for line in out.splitlines() if line]

    def changed_paths(self, commit_sha: str) -> tuple[str, ...]:
        """Paths a commit changed against its first parent (every path for a root commit)."""
        out = self._repo.git.diff_tree(
            "--no-commit-id", "--name-only", "-r", "--root", "-m", "--first-parent", commit_sha
        )
        return tuple(sorted({line for line in out.splitlines() if line}))


def history(repo_url: str, branch: str, cache_dir: Path) -> History:
    """Fetch the mirror of ``repo_url`` (``branch`` must exist) and return its :class:`History`."""
    return History(fetch_mirror(repo_url, branch, cache_dir))


def init_repository(path: Path, branch: str = "main") -> None:
    """``git init`` a new work repository at ``path`` on ``branch``."""
    git.Repo.init(Path(path), initial_branch=validate_branch(branch))


def commit_all(path: Path, message: str, identity: tuple[str, str]) -> str:
    """Stage everything in the work repository at ``path`` and commit it; ``identity`` (name, email)
    is used only where the repository's configuration has no user; return the new SHA."""
    repo = git.Repo(Path(path))
    repo.git.add("--all")
    reader = repo.config_reader()
    env: dict[str, str] = {}
    if not reader.has_option("user", "name"):
        env.update(GIT_AUTHOR_NAME=identity[0], GIT_COMMITTER_NAME=identity[0])
    if not reader.has_option("user", "email"):
        env.update(GIT_AUTHOR_EMAIL=identity[1], GIT_COMMITTER_EMAIL=identity[1])
    with repo.git.custom_environment(**env):
        repo.git.commit("--quiet", "-m", message)
    return repo.head.commit.hexsha


def describe_commits(repo_url: str, branch: str, cache_dir: Path, commit_shas: list[str]) -> dict[str, dict]:
    """Message, author, commit time of each SHA and whether it is still on ``branch``, from the local
    mirror as last fetched (no fetch: cheap enough for a page that polls).  Unknown SHAs are left out."""
    path = mirror_path(repo_url, cache_dir)
    shas = [validate_sha(s) for s in commit_shas]
    if not shas or not (path / "HEAD").exists():
        return {}
    repo = git.Repo(path)
    try:
        on_branch = set(repo.git.rev_list(f"refs/heads/{validate_branch(branch)}").split())
    except git.GitCommandError:
        on_branch = set()
    fmt = "--format=%H%x1f%an%x1f%cI%x1f%s"
    try:  # one git process for the whole page
        lines = repo.git.log("--no-walk=unsorted", fmt, *shas).splitlines()
    except git.GitCommandError:  # a SHA the mirror does not have: ask one by one
        lines = []
        for sha in shas:
            try:
                lines.append(repo.git.log("--no-walk", fmt, sha))
            except git.GitCommandError:
                continue
    described = {}
    for line in lines:
        full, author, committed_at, subject = line.split("\x1f", 3)
        described[full] = {
            "message": subject,
            "author": author,
            "committed_at": committed_at,
            "on_branch": full in on_branch,
        }
    return described
