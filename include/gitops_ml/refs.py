"""Pure checks and redaction for Git inputs: branch names, SHAs, repository URLs, credentials.

No git import here, so DAG files and the triggerer can use them cheaply; ``gitops_ml.source``
re-exports them.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from gitops_ml.errors import InvalidRef

_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
# Bounded repetitions: linear time even on a multi-megabyte line without any URL in it.
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]{0,30}://)[^/@\s]{1,512}@")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def redact_url(url: str) -> str:
    """Return ``url`` without user name, password or token (``https://tok@host/x`` -> ``https://host/x``)."""
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def redact(text: str) -> str:
    """Mask credentials of every URL inside free text (error messages, git output)."""
    return _URL_CREDENTIALS_RE.sub(r"\g<scheme>***@", text)


def validate_branch(branch: str) -> str:
    """Refuse a branch name git would refuse, or one that could be read as an option.

    Checked before any git call, following ``git check-ref-format --branch``.
    """
    problem = None
    if not branch:
        problem = "it is empty"
    elif branch.startswith("-"):
        problem = "it starts with '-' and would be read as a command-line option"
    elif _BAD_REF_CHARS.search(branch):
        problem = "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in branch or "@{" in branch or "//" in branch or branch == "@":
        problem = "it contains '..', '@{' or '//'"
    elif branch.endswith(("/", ".", ".lock")) or branch.startswith("/"):
        problem = "it starts or ends with '/', or ends with '.' or '.lock'"
    elif any(part.startswith(".") for part in branch.split("/")):
        problem = "a path component starts with '.'"
    if problem:
        raise InvalidRef(f"invalid branch name {branch!r}: {problem}")
    return branch


def validate_sha(commit_sha: str) -> str:
    """Return the SHA in lower case; refuse anything but 7 to 40 hex digits."""
    if not isinstance(commit_sha, str) or not _SHA_RE.match(commit_sha):
        raise InvalidRef(f"invalid commit SHA {commit_sha!r}: expected 7 to 40 hexadecimal digits")
    return commit_sha.lower()


def validate_repo_url(repo_url: str) -> str:
    if not repo_url:
        raise InvalidRef("no repository URL configured (set GITOPS_ML_REPO_URL or pass repo_url in the run conf)")
    if repo_url.startswith("-"):
        raise InvalidRef(f"invalid repository URL {redact(repo_url)!r}: it starts with '-'")
    return repo_url
