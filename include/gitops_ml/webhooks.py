"""Authenticate and parse push webhooks from GitHub, GitLab and Gitea (or Forgejo).

Framework-free: every function takes the request headers and the raw body
bytes, so any ASGI app can call it.  ``check_headers`` refuses a request from its
headers alone (no signature or token header, a wrong GitLab token, a declared
``Content-Length`` over ``MAX_BODY_BYTES``) before a byte of the body is read; the
HMAC signature is checked before the body is parsed; errors carry the HTTP status to
answer with and a one-line message that never contains the configured secret or the
received signature.  ``delivery_id`` names the delivery (the forge resends the same id
on a redelivery), so a receiver can answer a repeat without acting twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gitops_ml.errors import InputError, InvalidRef
from gitops_ml.refs import redact_url, validate_branch

MAX_BODY_BYTES = 5 * 1024 * 1024
_SHA_RE = re.compile(r"^[0-9a-fA-F]{40}$")
_ZERO_SHA = "0" * 40
_MAX_REF_LENGTH = 1024
# Keys of payload["repository"] / payload["project"] that hold a URL of the repository.
_URL_KEYS = (
    "clone_url",
    "ssh_url",
    "git_http_url",
    "git_ssh_url",
    "http_url",
    "html_url",
    "web_url",
    "git_url",
    "homepage",
)


class WebhookError(InputError):
    """A webhook request was refused; ``status_code`` is the HTTP status to answer with."""

    status_code: int = 400


class WebhookUnauthorized(WebhookError):
    status_code = 401


class WebhookBadRequest(WebhookError):
    status_code = 400


class WebhookTooLarge(WebhookError):
    status_code = 413


def too_large() -> WebhookTooLarge:
    return WebhookTooLarge(
        f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB "
        f"({MAX_BODY_BYTES} bytes); nothing more was read"
    )


@dataclass(frozen=True)
class PushEvent:
    """A push to a branch, as told by the forge."""

    provider: str
    branch: str
    previous_sha: str | None
    after_sha: str | None
    repo_urls: tuple[str, ...]
    commit_shas: tuple[str, ...]
    delivery_id: str | None = None


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(name).lower(): value for name, value in headers.items()}


def detect_provider(headers: Mapping[str, str]) -> str | None:
    """Name the forge that sent the request from its headers, or ``None``.

    Gitea and Forgejo also send GitHub-style headers, so their own headers are looked at first.
    """
    names = _lower(headers)
    if names.keys() & {"x-gitea-event", "x-gitea-signature", "x-forgejo-event", "x-forgejo-signature"}:
        return "gitea"
    if names.keys() & {"x-gitlab-event", "x-gitlab-token"}:
        return "gitlab"
    if names.keys() & {"x-github-event", "x-hub-signature-256", "x-hub-signature"}:
        return "github"
    return None


def _same(received: str, expected: str) -> bool:
    return hmac.compare_digest(received.strip().encode("utf-8", "replace"), expected.encode())


def _check_hmac(names: dict[str, str], header: str, prefix: str, body: bytes, secret: str) -> None:
    received = names.get(header.lower())
    if received is None:
        raise WebhookUnauthorized(f"missing {header} header")
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not _same(received.lower(), prefix + digest):
        raise WebhookUnauthorized(f"{header} header does not match the body signed with the configured secret")


# Delivery id headers, by provider (Forgejo also sends X-Gitea-Delivery; GitHub-style ones last).
_DELIVERY_HEADERS = {
    "gitea": ("X-Gitea-Delivery", "X-Forgejo-Delivery", "X-GitHub-Delivery"),
    "gitlab": ("X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"),
    "github": ("X-GitHub-Delivery",),
}
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The forge's id of this delivery (same id on a redelivery), or ``None`` when it sent none."""
    names = _lower(headers)
    provider = detect_provider(names)
    for header in _DELIVERY_HEADERS.get(provider or "", ()):
        value = names.get(header.lower())
        if value is None:
            continue
        value = value.strip()
        if not _DELIVERY_RE.match(value):
            raise WebhookBadRequest(f"header {header} must be 1 to 100 letters, digits, '.', '_' or '-'")
        return value
    return None


def check_headers(headers: Mapping[str, str], secret: str) -> str:
    """Everything that can be refused before the body is read; return the provider name.

    The forge, a configured secret, the signature (or token) header, the GitLab token itself,
    and a declared ``Content-Length`` within ``MAX_BODY_BYTES``.  The HMAC of the body is
    checked later, by ``authenticate``, on a body read up to the limit only.
    """
    names = _lower(headers)
    length = names.get("content-length")
    if length is not None:
        if not length.strip().isascii() or not length.strip().isdigit():
            raise WebhookBadRequest("header Content-Length must be a number of bytes")
        if int(length) > MAX_BODY_BYTES:
            raise too_large()
    provider = _known_provider(names, secret)
    if provider == "gitlab":
        authenticate(names, b"", secret)  # the token needs no body
    elif provider == "gitea":
        if not names.keys() & {"x-gitea-signature", "x-forgejo-signature", "x-hub-signature-256"}:
            raise WebhookUnauthorized("missing X-Gitea-Signature header")
    elif "x-hub-signature-256" not in names:
        detail = " (the SHA-1 X-Hub-Signature is not accepted)" if "x-hub-signature" in names else ""
        raise WebhookUnauthorized(f"missing X-Hub-Signature-256 header{detail}")
    return provider


def _known_provider(names: dict[str, str], secret: str) -> str:
    """The forge the headers name, refusing an unknown one and a server without a secret."""
    provider = detect_provider(names)
    if provider is None:
        raise WebhookUnauthorized(
            "unrecognised webhook: no X-Hub-Signature-256 (GitHub), "
            "X-Gitea-Signature (Gitea) or X-Gitlab-Token (GitLab) header"
        )
    if not secret:
        raise WebhookUnauthorized("no webhook secret is configured on this server, so every webhook is refused")
    return provider


def authenticate(headers: Mapping[str, str], body: bytes, secret: str) -> str:
    """Check the request's signature or token against ``secret``; return the provider name."""
    names = _lower(headers)
    provider = _known_provider(names, secret)
    if provider == "gitlab":
        received = names.get("x-gitlab-token")
        if received is None:
            raise WebhookUnauthorized("missing X-Gitlab-Token header")
        if not _same(received, secret):
            raise WebhookUnauthorized("X-Gitlab-Token header does not match the configured secret")
    elif provider == "gitea":
        if "x-gitea-signature" not in names and "x-forgejo-signature" in names:
            _check_hmac(names, "X-Forgejo-Signature", "", body, secret)
        elif "x-gitea-signature" not in names and "x-hub-signature-256" in names:
            _check_hmac(names, "X-Hub-Signature-256", "sha256=", body, secret)  # same HMAC, GitHub-style
        else:
            _check_hmac(names, "X-Gitea-Signature", "", body, secret)
    else:
        if "x-hub-signature-256" not in names and "x-hub-signature" in names:
            raise WebhookUnauthorized("missing X-Hub-Signature-256 header (the SHA-1 X-Hub-Signature is not accepted)")
        _check_hmac(names, "X-Hub-Signature-256", "sha256=", body, secret)
    return provider


def _is_push(provider: str, names: dict[str, str]) -> bool:
    if provider == "gitlab":
        header, push = "X-Gitlab-Event", "push hook"
    elif provider == "gitea":
        header = "X-Gitea-Event" if "x-gitea-event" in names or "x-forgejo-event" not in names else "X-Forgejo-Event"
        push = "push"
    else:
        header, push = "X-GitHub-Event", "push"
    event = names.get(header.lower())
    if event is None:
        raise WebhookBadRequest(f"missing {header} header")
    return event.strip().lower() == push


def _sha(payload: dict, field: str, *, fallback: str | None = None) -> str | None:
    value = payload.get(field)
    name = repr(field)
    if value is None and fallback is not None:
        value, name = payload.get(fallback), f"{field!r} (or {fallback!r})"
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise WebhookBadRequest(f"field {name} must be a 40-hex-digit commit SHA")
    value = value.lower()
    return None if value == _ZERO_SHA else value


def _repo_urls(payload: dict) -> tuple[str, ...]:
    urls: list[str] = []
    for section in ("repository", "project"):
        info = payload.get(section)
        if not isinstance(info, dict):
            continue
        for key in _URL_KEYS:
            value = info.get(key)
            if isinstance(value, str) and value:
                url = redact_url(value)
                if url not in urls:
                    urls.append(url)
    return tuple(urls)


def _commit_shas(payload: dict) -> tuple[str, ...]:
    commits = payload.get("commits")
    if commits is None:  # absent, or Gitea's JSON null for an empty list
        return ()
    if not isinstance(commits, list):
        raise WebhookBadRequest("field 'commits' must be a list")
    shas = []
    for index, commit in enumerate(commits):
        sha = commit.get("id") if isinstance(commit, dict) else None
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise WebhookBadRequest(f"field 'commits[{index}].id' must be a 40-hex-digit commit SHA")
        shas.append(sha.lower())
    return tuple(shas)


def parse_push(headers: Mapping[str, str], body: bytes, secret: str) -> PushEvent | None:
    """Authenticate, then parse a push; ``None`` for another event (ping...) or a tag push."""
    if len(body) > MAX_BODY_BYTES:
        raise too_large()
    provider = authenticate(headers, body, secret)
    if not _is_push(provider, _lower(headers)):
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WebhookBadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WebhookBadRequest("request body must be a JSON object")
    ref = payload.get("ref")
    if not isinstance(ref, str):
        raise WebhookBadRequest("field 'ref' is missing or not a string")
    if len(ref) > _MAX_REF_LENGTH:
        raise WebhookBadRequest(f"field 'ref' is longer than {_MAX_REF_LENGTH} characters")
    if ref.startswith("refs/tags/"):
        return None
    if not ref.startswith("refs/heads/"):
        raise WebhookBadRequest(f"field 'ref' must start with 'refs/heads/' or 'refs/tags/', got {ref!r}")
    try:
        branch = validate_branch(ref[len("refs/heads/") :])
    except InvalidRef as exc:
        raise WebhookBadRequest(f"field 'ref': {exc}") from None
    return PushEvent(
        provider=provider,
        branch=branch,
        previous_sha=_sha(payload, "before"),
        after_sha=_sha(payload, "after", fallback="checkout_sha" if provider == "gitlab" else None),
        repo_urls=_repo_urls(payload),
        commit_shas=_commit_shas(payload),
        delivery_id=delivery_id(headers),
    )
