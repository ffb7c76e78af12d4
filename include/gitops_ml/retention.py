"""Bounded disk: remove the work trees of finished runs, garbage-collect the DVC cache.

Every run checks its commit out in ``$GITOPS_ML_HOME/work/<sha>`` (a ``git worktree`` of the
bare mirror) and pulls a full copy of its data into it.  ``collect`` keeps:

* the latest ``GITOPS_ML_KEEP_WORKTREES`` work trees of runs that finished (by finish time;
  a run whose model did not pass the gate finished too), default 5;
* the work trees of failed runs for ``GITOPS_ML_KEEP_FAILED_HOURS`` after the failure
  (default 24), so the data that broke a run can be inspected;
* every work tree of a run still in progress, whatever the limits.

How a run in progress is told apart: the end of a run (``pipeline.finish``, the failure
callback) calls ``after_run``, which writes an end mark ``work/.state/<sha>.json`` holding
a fingerprint (inode, mtime, size) of the work tree's Git index.  Any later checkout of that
SHA (``git worktree add``, or the ``git reset --hard`` of a re-run) rewrites the index, so the
fingerprint no longer matches.  A work tree is finished only when its mark matches: positive
evidence, nothing is removed on a guess.  A tree without a matching mark is in progress; one
untouched for ``ABANDONED_AFTER_HOURS`` (longer than any task may run: train's timeout is 6 h),
or for ``GITOPS_ML_KEEP_FAILED_HOURS`` if that is longer, belongs to a run whose worker died
before its failure callback and is removed like a failed one.

Removal goes through Git (``git worktree remove --force``, then ``git worktree prune`` on
every mirror), so ``git worktree list`` stays right; a folder Git does not know is deleted
directly.  Only ``work/<40 or 64 hex>`` folders inside ``$GITOPS_ML_HOME`` are touched, never a
symbolic link, never anything whose resolved path leaves the home.

The DVC cache (``dvc-cache/files/md5``) keeps exactly the objects named by the ``*.dvc`` and
``dvc.lock`` files of the commits of the retained work trees and of the champion, challenger
and served-for commits of every watched model, plus every file their ``.dir`` manifests list
(read from the Git mirror, so an in-progress checkout counts as soon as it exists).  Everything
else under ``files/md5`` is deleted.  Not ``dvc gc``: it keeps what a workspace or a set of
revisions *of one repository* needs, and would have to open every work tree (untrusted
``.dvc/config``) and the champion's commits as DVC projects against their own caches; one
missing ``.dir`` manifest there makes it drop the files of that directory.  The cache layout
(``files/md5/<2 hex>/<30 hex>[.dir]``) is DVC 3's stable format and ``gitops_ml.data`` relies on
it too.  When any needed commit or model version cannot be read, the cache is left as it is.

DVC's site cache (``dvc-cache-site/repo/<token>``: hash and index databases, ~2 MB per work tree,
one per checkout) is trimmed to the entries of the retained work trees; DVC computes the token
(``Repo.site_cache_dir``), so it is asked through ``gitops_ml.data``.

Each home cleans itself: workers that share nothing each run this on their own home.  Running it
twice changes nothing the second time.  ``collect`` takes a lock (``work/.state/gc.lock``); a
second collector that finds it taken does nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError

log = logging.getLogger(__name__)

STATE_DIR = ".state"
ABANDONED_AFTER_HOURS = 24.0
MAX_POINTER_BYTES = 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_TREE_NAME_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_MD5_RE = re.compile(r"[0-9a-f]{32}(\.dir)?")
_OBJECT_NAME_RE = re.compile(r"[0-9a-f]{30}(\.dir)?")
_PREFIX_RE = re.compile(r"[0-9a-f]{2}")
_SITE_ENTRY_RE = re.compile(r"[0-9a-f]{32}")


class RetentionError(GitopsMLError):
    """The retention settings are invalid or a path is not safe to delete."""


class _CannotTell(Exception):
    """What the cache must keep is unknown (a mirror, a commit or the registry is unreadable)."""


class _GitFailed(Exception):
    """A git command exited non-zero; the message is its stderr."""


def _git(git_dir: Path, *args: str) -> str:
    """Run ``git -C git_dir ...`` (the git CLI, as ``gitops_ml.signatures`` does: GitPython stays in ``source``)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(git_dir), *args],
            capture_output=True,
            timeout=300,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _GitFailed(f"git {args[0]} in {git_dir}: {exc}") from None
    if done.returncode != 0:
        raise _GitFailed(f"git {args[0]} in {git_dir}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8", errors="replace")


@dataclass
class Report:
    """What one ``collect`` did (or, with ``dry_run``, would do)."""

    dry_run: bool
    enabled: bool = True
    kept: dict[str, str] = field(default_factory=dict)  # commit_sha -> why
    removed: dict[str, str] = field(default_factory=dict)  # commit_sha -> why
    worktree_bytes_freed: int = 0
    cache_objects_kept: int = 0
    cache_objects_removed: int = 0
    cache_bytes_freed: int = 0
    cache_skipped: str | None = None
    site_entries_removed: int = 0
    site_skipped: str | None = None

    def summary(self) -> str:
        if not self.enabled:
            return "retention is off (GITOPS_ML_KEEP_WORKTREES < 0): nothing removed"
        verb = "would remove" if self.dry_run else "removed"
        cache = (
            f"DVC cache left as it is ({self.cache_skipped})"
            if self.cache_skipped
            else f"{verb} {self.cache_objects_removed} DVC cache objects ({_mb(self.cache_bytes_freed)}), "
            f"kept {self.cache_objects_kept}"
        )
        return (
            f"{verb} {len(self.removed)} work tree(s) ({_mb(self.worktree_bytes_freed)}), kept "
            f"{len(self.kept)}; {cache}; {verb} {self.site_entries_removed} DVC site-cache entries"
            + (f" (site cache left as it is: {self.site_skipped})" if self.site_skipped else "")
        )

    def render(self) -> str:
        lines = [self.summary()]
        for sha, why in sorted(self.removed.items()):
            lines.append(f"  {'would remove' if self.dry_run else 'removed'}  {sha}  {why}")
        for sha, why in sorted(self.kept.items()):
            lines.append(f"  kept          {sha}  {why}")
        return "\n".join(lines)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _check_settings(settings: Settings) -> None:
    if settings.keep_failed_hours < 0:
        raise RetentionError(f"GITOPS_ML_KEEP_FAILED_HOURS must be 0 or more, got {settings.keep_failed_hours}")


# --- paths -----------------------------------------------------------------------------------


def _inside_home(settings: Settings, path: Path, what: str) -> Path:
    """``path`` resolved, refusing a symbolic link or anything outside the resolved home."""
    home = Path(settings.home).resolve()
    path = Path(path)
    if path.is_symlink():
        raise RetentionError(f"{what} {path} is a symbolic link: refusing to clean it")
    resolved = path.resolve()
    if not resolved.is_relative_to(home):
        raise RetentionError(f"{what} {path} resolves to {resolved}, outside GITOPS_ML_HOME {home}")
    return resolved


def _work_dir(settings: Settings) -> Path:
    return _inside_home(settings, settings.work_dir, "work folder")


def _state_dir(settings: Settings) -> Path:
    return _inside_home(settings, _work_dir(settings) / STATE_DIR, "work-state folder")


def _cache_dir(settings: Settings) -> Path:
    return _inside_home(settings, settings.dvc_cache_dir, "DVC cache")


def _trees(work_dir: Path) -> dict[str, Path]:
    """The work-tree folders (``work/<sha>``, real folders, no links) by commit SHA."""
    if not work_dir.is_dir():
        return {}
    found = {}
    for entry in os.scandir(work_dir):
        if _TREE_NAME_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            found[entry.name] = Path(entry.path)
    return found


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


# --- end marks and activity -----------------------------------------------------------------


def _admin_dir(tree: Path) -> Path | None:
    """The work tree's Git admin folder (``<mirror>/worktrees/<name>``), from its ``.git`` file."""
    gitfile = tree / ".git"
    try:
        if not stat.S_ISREG(gitfile.lstat().st_mode):
            return None
        text = gitfile.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text.removeprefix("gitdir:").strip()) if text.startswith("gitdir:") else None


def _fingerprint(tree: Path) -> list[int] | None:
    """(inode, mtime ns, size) of the work tree's Git index, which every checkout rewrites;
    of the folder itself when the index cannot be found; None when the tree does not exist."""
    admin = _admin_dir(tree)
    for path in ([admin / "index"] if admin else []) + [tree]:
        try:
            st = path.lstat()
        except OSError:
            continue
        return [st.st_ino, st.st_mtime_ns, st.st_size]
    return None


def _last_activity(tree: Path) -> float:
    admin = _admin_dir(tree)
    times = []
    for path in ([admin / "index"] if admin else []) + [tree]:
        try:
            times.append(path.lstat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def mark_finished(
    settings: Settings, commit_sha: str, failed: bool, run_id: str | None = None, now: float | None = None
) -> Path | None:
    """Write the end mark of the run of ``commit_sha`` on this home; None (nothing written) for a SHA
    that is not a full one or a commit without a work tree here (failed before checkout, or checked out
    on another worker)."""
    if not isinstance(commit_sha, str) or not _TREE_NAME_RE.fullmatch(commit_sha):
        return None
    if not (_work_dir(settings) / commit_sha).is_dir():
        return None
    now = time.time() if now is None else now
    state_dir = _state_dir(settings)
    state_dir.mkdir(parents=True, exist_ok=True)
    mark = {
        "commit_sha": commit_sha,
        "outcome": "failed" if failed else "finished",
        "run_id": run_id,
        "finished_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "finished_at_epoch": now,
        "worktree": _fingerprint(_work_dir(settings) / commit_sha),
    }
    path = state_dir / f"{commit_sha}.json"
    tmp = state_dir / f".{commit_sha}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(mark, sort_keys=True))
    os.replace(tmp, path)
    return path


def _read_mark(state_dir: Path, commit_sha: str) -> dict[str, Any] | None:
    path = state_dir / f"{commit_sha}.json"
    try:
        if path.is_symlink():
            return None
        mark = json.loads(path.read_text(encoding="utf-8"))
        float(mark["finished_at_epoch"])
        return mark if mark.get("outcome") in ("finished", "failed") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- which work trees go ----------------------------------------------------------------------


def _decide(
    settings: Settings, trees: dict[str, Path], state_dir: Path, now: float
) -> tuple[dict[str, str], dict[str, str]]:
    """(keep, remove): commit SHA -> reason, for every work tree."""
    keep: dict[str, str] = {}
    remove: dict[str, str] = {}
    finished: list[tuple[float, str]] = []
    failed_limit = settings.keep_failed_hours * 3600
    for sha, tree in trees.items():
        mark = _read_mark(state_dir, sha)
        if mark is None or mark.get("worktree") != _fingerprint(tree):
            idle_hours = (now - _last_activity(tree)) / 3600
            if idle_hours >= max(ABANDONED_AFTER_HOURS, settings.keep_failed_hours):
                remove[sha] = f"no run finished it and untouched for {idle_hours:.0f} h (abandoned)"
            else:
                keep[sha] = "run in progress" if mark is None else "checked out again since its run ended (in progress)"
            continue
        ended = float(mark["finished_at_epoch"])
        if mark["outcome"] == "failed":
            age_hours = (now - ended) / 3600
            if now - ended < failed_limit:
                keep[sha] = f"failed {age_hours:.1f} h ago (kept {settings.keep_failed_hours:g} h)"
            else:
                remove[sha] = f"failed {age_hours:.1f} h ago (kept {settings.keep_failed_hours:g} h)"
        else:
            finished.append((ended, sha))
    for rank, (_, sha) in enumerate(sorted(finished, reverse=True), start=1):
        if rank <= settings.keep_worktrees:
            keep[sha] = f"finished, latest {rank} of {settings.keep_worktrees}"
        else:
            remove[sha] = f"finished, older than the latest {settings.keep_worktrees}"
    return keep, remove


# --- git -----------------------------------------------------------------------------------------


def _mirrors(settings: Settings) -> list[Path]:
    cache = settings.git_cache_dir
    if not cache.is_dir() or cache.is_symlink():
        return []
    return sorted(p for p in cache.glob("*.git") if p.is_dir() and not p.is_symlink() and (p / "HEAD").exists())


def _registered_trees(mirrors: list[Path]) -> dict[Path, Path]:
    """Resolved work-tree path -> mirror, from ``git worktree list --porcelain -z`` of each mirror."""
    owner: dict[Path, Path] = {}
    for mirror in mirrors:
        try:
            listing = _git(mirror, "worktree", "list", "--porcelain", "-z")
        except _GitFailed as exc:
            log.warning("could not list the work trees: %s", exc)
            continue
        for item in listing.split("\0"):
            if item.startswith("worktree "):
                owner[Path(item[len("worktree ") :]).resolve()] = mirror
    return owner


def _remove_tree(settings: Settings, tree: Path, mirror: Path | None) -> None:
    """``git worktree remove --force`` through the owning mirror; the folder itself when Git cannot."""
    work_dir = _work_dir(settings)
    if tree.is_symlink() or tree.resolve().parent != work_dir or not _TREE_NAME_RE.fullmatch(tree.name):
        raise RetentionError(f"refusing to remove {tree}: not a work-tree folder of {work_dir}")
    if mirror is not None:
        try:
            _git(mirror, "worktree", "remove", "--force", "--force", "--", str(tree))
        except _GitFailed as exc:
            log.warning("%s: deleting the folder %s", exc, tree)
    if tree.exists() or tree.is_symlink():
        shutil.rmtree(tree)  # fd-based on Linux: never follows a link inside the tree


def _prune(mirrors: list[Path]) -> None:
    for mirror in mirrors:
        try:
            _git(mirror, "worktree", "prune")
        except _GitFailed as exc:
            log.warning("%s", exc)


def _find_commit(mirrors: list[Path], commit_sha: str, preferred: Path | None = None) -> Path:
    """The mirror that holds ``commit_sha`` (``preferred`` first)."""
    for mirror in ([preferred] if preferred else []) + [m for m in mirrors if m != preferred]:
        try:
            _git(mirror, "cat-file", "-e", f"{commit_sha}^{{commit}}")
            return mirror
        except _GitFailed:
            continue
    raise _CannotTell(f"commit {commit_sha} is in no Git mirror under {mirrors[0].parent if mirrors else '?'}")


def _walk_md5(node: Any, found: set[str], seen: set[int]) -> None:
    """Every ``md5: <hash>`` value in a parsed pointer (each object visited once: no alias blow-up)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "md5" and isinstance(value, str) and _MD5_RE.fullmatch(value):
                found.add(value)
            else:
                _walk_md5(value, found, seen)
    elif isinstance(node, list):
        for value in node:
            _walk_md5(value, found, seen)


def _commit_hashes(mirror: Path, commit_sha: str) -> set[str]:
    """The DVC hashes named by the ``*.dvc`` and ``dvc.lock`` files of ``commit_sha`` (from Git, not the disk)."""
    import yaml  # noqa: PLC0415

    found: set[str] = set()
    listing = _git(mirror, "ls-tree", "-r", "-z", "-l", "--full-tree", commit_sha)
    for entry in listing.split("\0"):
        if "\t" not in entry:
            continue
        meta, path = entry.split("\t", 1)
        mode, kind, oid, size = meta.split()
        name = path.rsplit("/", 1)[-1]
        if kind != "blob" or mode == "120000" or not (name.endswith(".dvc") or name == "dvc.lock"):
            continue
        if int(size) > MAX_POINTER_BYTES:
            log.warning(
                "commit %s: %s is over %d bytes, not read as a DVC pointer", commit_sha, path, MAX_POINTER_BYTES
            )
            continue
        try:
            _walk_md5(yaml.safe_load(_git(mirror, "cat-file", "blob", oid)), found, set())
        except yaml.YAMLError:
            continue  # a malformed pointer: no run can pull it, so it needs nothing
    return found


def _manifest_entries(cache_dir: Path, dir_md5: str) -> set[str]:
    """The file hashes a ``.dir`` manifest in the cache lists (none when absent or not matching its hash)."""
    path = _object_path(cache_dir, dir_md5)
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return set()
        raw = path.read_bytes()
        if hashlib.md5(raw).hexdigest() != dir_md5.removesuffix(".dir"):
            return set()
        entries = json.loads(raw)
    except (OSError, ValueError):
        return set()
    if not isinstance(entries, list):
        return set()
    return {
        e["md5"]
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("md5"), str)
        and _MD5_RE.fullmatch(e["md5"])
        and not e["md5"].endswith(".dir")
    }


def _object_path(cache_dir: Path, md5: str) -> Path:
    return cache_dir / "files" / "md5" / md5[:2] / md5[2:]


def _model_commits(settings: Settings) -> list[tuple[str, str | None]]:
    """(commit SHA, repository URL) of the champion, challenger and served-for commit of every watched model."""
    from gitops_ml import registry, watch  # noqa: PLC0415

    names = {settings.model_name}
    try:
        names |= {w.model_name for w in watch.load_watches() if w.model_name}
    except GitopsMLError as exc:
        log.warning(
            "watch configuration unreadable (%s): keeping the DVC data of model %s only", exc, settings.model_name
        )
    commits = []
    for name in sorted(names):
        model_settings = settings.with_overrides(model_name=name)
        for alias in (registry.CHAMPION, registry.CHALLENGER):
            try:
                version = registry.get_alias(model_settings, alias)
            except Exception as exc:  # noqa: BLE001 - any registry failure: keep the cache as it is
                raise _CannotTell(f"model registry unreadable ({name}@{alias}): {exc}") from None
            if version is None:
                continue
            tags = registry.version_tags(version)
            for key in ("commit_sha", "served_for_commit"):
                if tags.get(key):
                    commits.append((tags[key], tags.get("repo_url")))
    return commits


def _needed_objects(
    settings: Settings, cache_dir: Path, tree_commits: dict[str, Path | None], mirrors: list[Path]
) -> set[str]:
    """Every cache object (md5, ``.dir`` included) the retained work trees and the model versions need."""
    from gitops_ml.source import mirror_path  # noqa: PLC0415

    wanted: dict[str, Path | None] = dict(tree_commits)
    for commit_sha, repo_url in _model_commits(settings):
        if not _TREE_NAME_RE.fullmatch(commit_sha):
            raise _CannotTell(f"model version tag names a commit {commit_sha!r} that is not a full SHA")
        preferred = mirror_path(repo_url, settings.git_cache_dir) if repo_url else None
        wanted.setdefault(commit_sha, preferred if preferred in mirrors else None)
    needed: set[str] = set()
    for commit_sha, preferred in sorted(wanted.items()):
        mirror = _find_commit(mirrors, commit_sha, preferred)
        try:
            hashes = _commit_hashes(mirror, commit_sha)
        except (_GitFailed, ValueError) as exc:
            raise _CannotTell(f"could not read the DVC pointers of commit {commit_sha}: {exc}") from None
        needed |= hashes
        for md5 in hashes:
            if md5.endswith(".dir"):
                needed |= _manifest_entries(cache_dir, md5)
    return needed


def _cache_objects(cache_dir: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(md5, path, lstat) of every object file under ``files/md5`` (DVC's temporary files and anything
    that is not ``<2 hex>/<30 hex>[.dir]`` are left alone)."""
    root = cache_dir / "files" / "md5"
    if not root.is_dir() or root.is_symlink():
        return
    for prefix in os.scandir(root):
        if not _PREFIX_RE.fullmatch(prefix.name) or not prefix.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(prefix.path):
            if _OBJECT_NAME_RE.fullmatch(entry.name):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield prefix.name + entry.name, Path(entry.path), st


def _site_entries(settings: Settings, cache_dir: Path) -> dict[str, Path]:
    site_repos = cache_dir.with_name(cache_dir.name + "-site") / "repo"
    if not site_repos.is_dir() or site_repos.is_symlink():
        return {}
    _inside_home(settings, site_repos, "DVC site cache")
    return {
        e.name: Path(e.path)
        for e in os.scandir(site_repos)
        if _SITE_ENTRY_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
    }


def _site_entry_of(tree: Path, cache_dir: Path) -> str | None:
    """The DVC site-cache entry (token) of a work tree, as DVC computes it; None for a tree without ``.dvc``."""
    if not (tree / ".dvc").is_dir():
        return None
    from gitops_ml import data  # noqa: PLC0415

    repo = data._open_repo(tree, cache_dir)  # the one place that opens a work tree with DVC
    try:
        return Path(repo.site_cache_dir).name
    finally:
        repo.close()


# --- the collector ------------------------------------------------------------------------------


def collect(settings: Settings, dry_run: bool = False, now: float | None = None) -> Report:
    """Remove the work trees that are no longer kept, then trim the DVC cache and site cache.

    ``now`` (seconds since the epoch) is the time the ages are measured against (default: now).
    Raises ``RetentionError`` for invalid settings or an unsafe path; never deletes outside
    ``$GITOPS_ML_HOME``.
    """
    report = Report(dry_run=dry_run)
    if settings.keep_worktrees < 0:
        report.enabled = False
        return report
    _check_settings(settings)
    now = time.time() if now is None else now
    work_dir = _work_dir(settings)
    if not work_dir.is_dir():  # nothing was ever checked out here, so nothing was pulled either
        report.cache_skipped = report.site_skipped = f"no work folder {work_dir} yet"
        return report
    state_dir = _state_dir(settings)
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "gc.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.info("another cleanup of %s is running: leaving it to that one", settings.home)
            report.cache_skipped = report.site_skipped = "another cleanup was running"
            return report
        _collect_locked(settings, report, work_dir, state_dir, now)
    return report


def _collect_locked(settings: Settings, report: Report, work_dir: Path, state_dir: Path, now: float) -> None:
    cache_dir = _cache_dir(settings)
    site_before = _site_entries(settings, cache_dir)  # entries created after this are never touched
    trees = _trees(work_dir)
    keep, remove = _decide(settings, trees, state_dir, now)
    report.kept, report.removed = keep, remove
    mirrors = _mirrors(settings)
    owners = _registered_trees(mirrors)

    site_keep: set[str] = set()
    try:
        for sha in keep:
            token = _site_entry_of(trees[sha], cache_dir)
            if token:
                site_keep.add(token)
    except Exception as exc:  # noqa: BLE001 - unknown token: keep the whole site cache
        report.site_skipped = f"could not open work tree {sha} with DVC: {exc}"

    for sha in sorted(remove):
        report.worktree_bytes_freed += _disk_usage(trees[sha])
        if not report.dry_run:
            _remove_tree(settings, trees[sha], owners.get(trees[sha].resolve()))
            (state_dir / f"{sha}.json").unlink(missing_ok=True)
    if not report.dry_run:
        _prune(mirrors)
        for mark in state_dir.glob("*.json"):  # marks of work trees that no longer exist here
            if mark.stem not in trees or mark.stem in remove:
                mark.unlink(missing_ok=True)

    if report.site_skipped is None:
        for token, entry in sorted(site_before.items()):
            if token not in site_keep:
                report.site_entries_removed += 1
                if not report.dry_run:
                    shutil.rmtree(entry, ignore_errors=True)

    try:
        tree_commits = {sha: owners.get(trees[sha].resolve()) for sha in keep}
        needed = _needed_objects(settings, cache_dir, tree_commits, mirrors)
    except _CannotTell as exc:
        report.cache_skipped = str(exc)
        log.warning("DVC cache not collected: %s", exc)
        return
    garbage = []
    for md5, path, st in _cache_objects(cache_dir):
        if md5 in needed:
            report.cache_objects_kept += 1
        else:
            garbage.append((path, st))
    if set(_trees(work_dir)) - set(trees):  # a run checked a commit out meanwhile: its needs are unknown
        report.cache_skipped = "a work tree appeared during the cleanup; the next cleanup collects the cache"
        return
    for path, st in garbage:
        report.cache_objects_removed += 1
        report.cache_bytes_freed += st.st_blocks * 512
        if not report.dry_run:
            path.unlink(missing_ok=True)


def after_run(settings: Settings, commit_sha: str, failed: bool = False, run_id: str | None = None) -> Report | None:
    """End of a run (``pipeline.finish``, the failure callback): mark its work tree finished or failed and
    collect.  Never raises: a cleanup problem is a warning, never the run's failure."""
    try:
        mark_finished(settings, commit_sha, failed=failed, run_id=run_id)  # also when off: turning it on later works
        if settings.keep_worktrees < 0:
            return None
        report = collect(settings)
        log.info("disk cleanup after commit %s: %s", commit_sha, report.summary())
        return report
    except Exception as exc:  # noqa: BLE001 - a full disk is better than a failed run
        log.warning("disk cleanup after commit %s failed (the run is not affected): %s", commit_sha, exc)
        return None
