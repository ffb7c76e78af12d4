"""Commit signatures (GPG and SSH), judged the way ``git verify-commit`` judges them.

SSH signatures are checked against an allowed signers file (``gpg.ssh.allowedSignersFile``);
GPG signatures against a private GNUPGHOME that holds only the allowed public keys, built
from an armored keyring file and cached by the hash of its content.  The user's own
``~/.gnupg``, ``~/.ssh`` and global git configuration are never consulted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gitops_ml.errors import CommitNotFound, GitopsMLError, InputError
from gitops_ml.refs import redact, validate_sha

POLICIES = ("off", "warn", "enforce")
_HEADERS = {"-----BEGIN PGP SIGNATURE-----": "gpg", "-----BEGIN SSH SIGNATURE-----": "ssh"}
_FORMAT = "%G?%n%GK%n%GS%n%GF%n%GG"


class SignatureConfigError(InputError):
    """The signature policy, the allowed signers file or the GPG keyring is wrong or missing."""


@dataclass(frozen=True)
class SignatureCheck:
    """What git says about one commit's signature; ``reason`` is a sentence naming the SHA."""

    commit_sha: str
    signed: bool
    verified: bool
    kind: str | None
    signer: str | None
    reason: str


@dataclass(frozen=True)
class SignatureDecision:
    """``action`` is "accept", "warn" or "reject"; ``message`` is None for a silent accept."""

    action: str
    message: str | None


def validate_policy(policy: str) -> str:
    """Return ``policy`` if it is one of :data:`POLICIES`, else raise :class:`SignatureConfigError`."""
    if policy not in POLICIES:
        raise SignatureConfigError(f"invalid signature policy {policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def decide(policy: str, check: SignatureCheck | None) -> SignatureDecision:
    """Apply the policy: "off" accepts everything, "warn" warns and "enforce" rejects unverified commits."""
    if validate_policy(policy) == "off" or (check is not None and check.verified):
        return SignatureDecision("accept", None)
    reason = check.reason if check is not None else "the commit signature was not checked"
    return SignatureDecision("warn" if policy == "warn" else "reject", reason)


def _git(git_dir: Path, args: list[str], sha: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
    base.pop("GNUPGHOME", None)
    try:
        return subprocess.run(
            ["git", "-C", str(git_dir), *args],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitopsMLError(f"could not run git to check the signature of commit {sha}: {redact(str(exc))}") from exc


def _gnupg_home(keyring: Path, cache: Path) -> Path:
    """Import ``keyring`` into a 0700 GNUPGHOME under ``cache`` named by its content hash; reuse it later."""
    content = keyring.read_bytes()
    if b"PRIVATE KEY BLOCK" in content:
        raise SignatureConfigError(f"GPG keyring {keyring} contains a private key; it must hold public keys only")
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    home = cache / f"gnupg-{hashlib.sha256(content).hexdigest()[:32]}"
    if home.is_dir():
        return home
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=cache))  # mode 0700
    try:
        (staging / "gpg.conf").write_text("no-autostart\n")  # public keys only: no gpg-agent, for git's gpg too
        try:
            done = subprocess.run(
                ["gpg", "--batch", "--no-tty", "--import", str(keyring)],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "GNUPGHOME": str(staging), "LC_ALL": "C"},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GitopsMLError(f"could not run gpg to import the GPG keyring {keyring}: {exc}") from exc
        if done.returncode != 0:
            raise SignatureConfigError(f"could not import the GPG keyring {keyring}: {redact(done.stderr.strip())}")
        try:
            staging.rename(home)  # atomic; another worker may have won the race
        except OSError:
            if not home.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def verify_commit(
    git_dir: Path,
    commit_sha: str,
    *,
    allowed_signers: Path | None = None,
    gpg_keyring: Path | None = None,
    gnupg_home_cache: Path | None = None,
) -> SignatureCheck:
    """Check the signature of ``commit_sha`` in ``git_dir`` against the allowed SSH signers / GPG keys."""
    sha = validate_sha(commit_sha)
    for label, path in (("allowed signers file", allowed_signers), ("GPG keyring", gpg_keyring)):
        if path is not None and not Path(path).is_file():
            raise SignatureConfigError(f"the {label} {path} does not exist or is not a file")
    found = _git(git_dir, ["rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}"], sha)
    if found.returncode != 0:
        if found.returncode == 1 and not found.stderr.strip():
            raise CommitNotFound(f"commit {sha} not found in {git_dir}")
        raise GitopsMLError(f"git could not resolve commit {sha} in {git_dir}: {redact(found.stderr.strip())}")
    sha = found.stdout.strip()
    obj = _git(git_dir, ["cat-file", "commit", sha], sha)
    if obj.returncode != 0:
        raise GitopsMLError(f"git could not read commit {sha}: {redact(obj.stderr.strip())}")
    header = obj.stdout.split("\n\n", 1)[0]
    sig = next(
        (line.split(" ", 1)[1] for line in header.splitlines() if line.startswith(("gpgsig ", "gpgsig-sha256 "))), None
    )
    if sig is None:
        return SignatureCheck(sha, False, False, None, None, f"commit {sha} is not signed")
    kind = _HEADERS.get(sig.strip())

    def result(verified: bool, signer: str | None, reason: str) -> SignatureCheck:
        return SignatureCheck(sha, True, verified, kind, signer, reason)

    if kind is None:
        return result(False, None, f"commit {sha} has a signature in an unsupported format (only GPG and SSH)")
    if kind == "ssh" and allowed_signers is None:
        return result(False, None, f"commit {sha} is signed with SSH but no allowed signers file is configured")
    if kind == "gpg" and gpg_keyring is None:
        return result(False, None, f"commit {sha} is signed with GPG but no GPG keyring is configured")

    args = [
        "-c",
        "gpg.program=gpg",
        "-c",
        "gpg.ssh.program=ssh-keygen",
        "-c",
        f"gpg.ssh.allowedSignersFile={allowed_signers or ''}",
        "log",
        "-1",
        "--no-show-signature",
        f"--format={_FORMAT}",
        sha,
        "--",
    ]
    if kind == "ssh":
        shown = _git(git_dir, args, sha)
    else:  # without a cache, a GNUPGHOME for this call only
        assert gpg_keyring is not None  # a GPG signature without a keyring was answered above
        with tempfile.TemporaryDirectory(prefix="gitops-ml-gnupg-") as scratch:
            home = _gnupg_home(Path(gpg_keyring), Path(gnupg_home_cache or scratch))
            shown = _git(git_dir, args, sha, {"GNUPGHOME": str(home)})
    if shown.returncode != 0:
        raise GitopsMLError(f"git could not check the signature of commit {sha}: {redact(shown.stderr.strip())}")
    status, key, name, fpr, raw = (shown.stdout + "\n" * 5).split("\n", 4)
    label, key_desc = ("SSH", f"SSH key {key}") if kind == "ssh" else ("GPG", f"GPG key {fpr or key}")
    signer = (name or key or None) if kind == "ssh" else (fpr or key or None)
    if status == "G" or (status == "U" and kind == "gpg"):  # our keyring holds only allowed keys
        by = f" ({name})" if name else ""
        return result(True, signer, f"commit {sha} has a good {label} signature by {key_desc}{by}")
    if status == "U":  # SSH: good signature, but no allowed signer matched (unknown or expired key)
        detail = [ln for ln in raw.strip().splitlines() if not ln.startswith(("Good ", "No principal matched"))]
        extra = f" ({redact('; '.join(detail))})" if detail else ""
        return result(
            False,
            signer,
            f"commit {sha} is signed by {key_desc} which is not in the allowed signers file {allowed_signers}{extra}",
        )
    reasons = {
        "B": f"commit {sha} has a BAD {label} signature: the commit or its signature was altered",
        "X": f"commit {sha} has a good {label} signature that has expired",
        "Y": f"commit {sha} is signed by {key_desc}, which has expired",
        "R": f"commit {sha} is signed by {key_desc}, which has been revoked",
    }
    if kind == "gpg":  # E: gpg has no public key for the signature, i.e. not an allowed key
        reasons["E"] = f"commit {sha} is signed by {key_desc} which is not in the GPG keyring {gpg_keyring}"
    fallback = f"git could not check the {label} signature of commit {sha}: {redact(raw.strip()) or status}"
    return result(False, signer, reasons.get(status, fallback))
