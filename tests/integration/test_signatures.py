"""Commit signatures with real GPG and SSH keys made in the test: git's verdict, the policy, config errors."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from gitops_ml import signatures
from gitops_ml.errors import CommitNotFound, InputError, InvalidRef
from gitops_ml.signatures import (
    POLICIES,
    SignatureCheck,
    SignatureConfigError,
    SignatureDecision,
    decide,
    validate_policy,
    verify_commit,
)


def run(cwd: Path, *args: str, **env: str) -> str:
    """Run a command isolated from the user's git config, ssh-agent and GNUPGHOME."""
    base = {k: v for k, v in os.environ.items() if k not in ("GNUPGHOME", "SSH_AUTH_SOCK")}
    base.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", **env)
    return subprocess.run(args, cwd=cwd, env=base, check=True, capture_output=True, text=True).stdout.strip()


def gpg_key(home: Path, uid: str) -> str:
    home.mkdir(mode=0o700)
    run(
        home,
        "gpg",
        "--batch",
        "--passphrase",
        "",
        "--quick-gen-key",
        uid,
        "ed25519",
        "sign",
        "never",
        GNUPGHOME=str(home),
    )
    listing = run(home, "gpg", "--list-keys", "--with-colons", GNUPGHOME=str(home))
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def commit(repo: Path, text: str, *sign: str, **env: str) -> str:
    (repo / "model.txt").write_text(text)
    run(repo, "git", "add", "model.txt")
    run(repo, "git", *sign, "commit", "-q", *(["-S"] if sign else []), "-m", text, **env)
    return run(repo, "git", "rev-parse", "HEAD")


def tampered(repo: Path, sha: str) -> str:
    """A copy of commit ``sha`` with another message but the same signature header."""
    body = run(repo, "git", "cat-file", "commit", sha) + " (tampered)\n"
    return subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
        cwd=repo,
        input=body,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    base = tmp_path_factory.mktemp("sig")
    repo = base / "repo"
    run(base, "git", "init", "-q", "-b", "main", str(repo))
    run(repo, "git", "config", "user.name", "Alice")
    run(repo, "git", "config", "user.email", "alice@example.com")
    homes = [base / "ga", base / "gm"]
    try:
        fpr_a, fpr_m = gpg_key(homes[0], "Alice <alice@example.com>"), gpg_key(homes[1], "Mallory <mal@example.com>")
        for name in ("alice", "mallory"):
            run(
                base, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name), "-C", f"{name}@example.com"
            )
        gpg = ["-c", "gpg.program=gpg", "-c"]
        ssh = ["-c", "gpg.format=ssh", "-c"]
        shas = {
            "unsigned": commit(repo, "unsigned"),
            "gpg_alice": commit(repo, "gpg alice", *gpg, f"user.signingkey={fpr_a}", GNUPGHOME=str(homes[0])),
            "gpg_mallory": commit(repo, "gpg mallory", *gpg, f"user.signingkey={fpr_m}", GNUPGHOME=str(homes[1])),
            "ssh_alice": commit(repo, "ssh alice", *ssh, f"user.signingkey={base / 'alice.pub'}"),
            "ssh_mallory": commit(repo, "ssh mallory", *ssh, f"user.signingkey={base / 'mallory.pub'}"),
        }
        shas["gpg_bad"] = tampered(repo, shas["gpg_alice"])
        shas["ssh_bad"] = tampered(repo, shas["ssh_alice"])
        keyring = base / "allowed.asc"
        keyring.write_text(run(base, "gpg", "--armor", "--export", fpr_a, GNUPGHOME=str(homes[0])))
        revocation = (homes[0] / "openpgp-revocs.d" / f"{fpr_a}.rev").read_text().replace(":-----BEGIN", "-----BEGIN")
        (base / "revoked.asc").write_text(keyring.read_text() + "\n" + revocation)
        alice_pub = (base / "alice.pub").read_text().strip()
        (base / "allowed_signers").write_text(f"alice@example.com {alice_pub}\n")
        (base / "expired_signers").write_text(f'alice@example.com valid-before="20200101" {alice_pub}\n')
        ssh_fpr = {n: run(base, "ssh-keygen", "-lf", str(base / f"{n}.pub")).split()[1] for n in ("alice", "mallory")}
        yield {
            "base": base,
            "repo": repo,
            "shas": shas,
            "keyring": keyring,
            "fpr_a": fpr_a,
            "fpr_m": fpr_m,
            "allowed": base / "allowed_signers",
            "ssh_fpr": ssh_fpr,
            "gm_home": homes[1],
        }
    finally:
        for home in homes:  # key generation and signing started a gpg-agent in each home
            subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, check=False)


def check(s, case, **kw) -> SignatureCheck:
    kw.setdefault("allowed_signers", s["allowed"])
    kw.setdefault("gpg_keyring", s["keyring"])
    kw.setdefault("gnupg_home_cache", s["base"] / "cache")
    return verify_commit(s["repo"], s["shas"][case], **kw)


def test_unsigned_commit(signed):
    sha = signed["shas"]["unsigned"]
    result = check(signed, "unsigned")
    assert result == SignatureCheck(sha, False, False, None, None, f"commit {sha} is not signed")


def test_gpg_signature_by_a_key_in_the_keyring_is_verified(signed):
    result = check(signed, "gpg_alice")
    assert (result.signed, result.verified, result.kind, result.signer) == (True, True, "gpg", signed["fpr_a"])
    assert signed["shas"]["gpg_alice"] in result.reason and "good GPG signature" in result.reason


def test_ssh_signature_by_an_allowed_signer_is_verified(signed):
    result = check(signed, "ssh_alice")
    assert (result.signed, result.verified, result.kind, result.signer) == (True, True, "ssh", "alice@example.com")
    assert signed["shas"]["ssh_alice"] in result.reason and signed["ssh_fpr"]["alice"] in result.reason


def test_ssh_key_not_in_allowed_signers_is_not_verified(signed):
    sha, fpr = signed["shas"]["ssh_mallory"], signed["ssh_fpr"]["mallory"]
    result = check(signed, "ssh_mallory")
    assert (result.signed, result.verified, result.kind, result.signer) == (True, False, "ssh", fpr)
    assert result.reason == (
        f"commit {sha} is signed by SSH key {fpr} which is not in the allowed signers file {signed['allowed']}"
    )


def test_ssh_key_expired_in_allowed_signers_is_not_verified(signed):
    result = check(signed, "ssh_alice", allowed_signers=signed["base"] / "expired_signers")
    assert result.signed and not result.verified and "key has expired" in result.reason
    assert signed["shas"]["ssh_alice"] in result.reason


def test_gpg_key_not_in_the_keyring_is_not_verified(signed):
    sha = signed["shas"]["gpg_mallory"]
    result = check(signed, "gpg_mallory")
    assert (result.signed, result.verified, result.kind) == (True, False, "gpg")
    assert signed["fpr_m"].endswith(result.signer) and sha in result.reason
    assert f"not in the GPG keyring {signed['keyring']}" in result.reason


def test_ambient_gnupghome_is_ignored(signed, monkeypatch):
    """Mallory's own GNUPGHOME holds her key: it must not make her signature count."""
    monkeypatch.setenv("GNUPGHOME", str(signed["gm_home"]))
    assert not check(signed, "gpg_mallory").verified
    assert not check(signed, "gpg_mallory", gnupg_home_cache=None).verified
    assert check(signed, "gpg_alice", gnupg_home_cache=None).verified


def test_revoked_gpg_key_is_not_verified(signed):
    result = check(signed, "gpg_alice", gpg_keyring=signed["base"] / "revoked.asc")
    assert result.signed and not result.verified and "revoked" in result.reason
    assert signed["shas"]["gpg_alice"] in result.reason


@pytest.mark.parametrize("case,kind", [("gpg_bad", "gpg"), ("ssh_bad", "ssh")])
def test_altered_commit_has_a_bad_signature(signed, case, kind):
    result = check(signed, case)
    assert (result.signed, result.verified, result.kind) == (True, False, kind)
    assert f"commit {signed['shas'][case]} has a BAD" in result.reason


@pytest.mark.parametrize("case,missing", [("ssh_alice", "allowed signers file"), ("gpg_alice", "GPG keyring")])
def test_signed_commit_without_the_matching_list_is_not_verified(signed, case, missing):
    result = check(signed, case, allowed_signers=None, gpg_keyring=None)
    assert result.signed and not result.verified and f"no {missing} is configured" in result.reason
    assert signed["shas"][case] in result.reason


def test_gnupg_home_is_cached_by_keyring_content(signed, tmp_path, monkeypatch):
    keyring, cache, imports = tmp_path / "keys.asc", tmp_path / "cache", []
    real_run = subprocess.run

    def counting_run(args, *a, **kw):  # a spy: every call still runs the real gpg/git, we only count imports
        imports.extend(["import"] if args[0] == "gpg" and "--import" in args else [])
        return real_run(args, *a, **kw)

    monkeypatch.setattr(signatures.subprocess, "run", counting_run)
    keyring.write_text(signed["keyring"].read_text())
    assert check(signed, "gpg_alice", gpg_keyring=keyring, gnupg_home_cache=cache).verified
    homes = list(cache.iterdir())
    assert len(homes) == 1 and stat.S_IMODE(homes[0].stat().st_mode) == 0o700 and len(imports) == 1
    assert check(signed, "gpg_mallory", gpg_keyring=keyring, gnupg_home_cache=cache).signed
    assert list(cache.iterdir()) == homes and len(imports) == 1  # same content: not re-imported
    keyring.write_text(signed["keyring"].read_text() + "\n")
    assert check(signed, "gpg_alice", gpg_keyring=keyring, gnupg_home_cache=cache).verified
    assert len(list(cache.iterdir())) == 2 and len(imports) == 2
    assert not any(p.name.startswith("S.gpg-agent") for home in cache.iterdir() for p in home.iterdir())


def test_abbreviated_sha_is_resolved(signed):
    sha = signed["shas"]["ssh_alice"]
    assert verify_commit(signed["repo"], sha[:10].upper(), allowed_signers=signed["allowed"]).commit_sha == sha


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unsigned", {"off": "accept", "warn": "warn", "enforce": "reject"}),
        ("gpg_alice", {"off": "accept", "warn": "accept", "enforce": "accept"}),
        ("ssh_alice", {"off": "accept", "warn": "accept", "enforce": "accept"}),
        ("ssh_mallory", {"off": "accept", "warn": "warn", "enforce": "reject"}),
        ("gpg_mallory", {"off": "accept", "warn": "warn", "enforce": "reject"}),
    ],
)
def test_decide_under_each_policy(signed, case, expected):
    result = check(signed, case)
    for policy in POLICIES:
        decision = decide(policy, result)
        assert decision.action == expected[policy], (policy, decision)
        if decision.action == "accept":
            assert decision.message is None
        else:
            assert decision.message == result.reason and signed["shas"][case] in decision.message


def test_decide_without_a_check():
    assert decide("off", None) == SignatureDecision("accept", None)
    assert decide("warn", None).action == "warn"
    assert decide("enforce", None).action == "reject"


def test_invalid_policy_is_refused():
    assert [validate_policy(p) for p in POLICIES] == list(POLICIES)
    for bad in ("strict", "Enforce", ""):
        with pytest.raises(SignatureConfigError, match=f"invalid signature policy {bad!r}") as err:
            decide(bad, None)
        assert isinstance(err.value, InputError)


@pytest.mark.parametrize("arg", ["allowed_signers", "gpg_keyring"])
def test_missing_list_file_names_the_path(signed, arg, tmp_path):
    missing = tmp_path / "nope" / arg
    with pytest.raises(SignatureConfigError, match=str(missing)) as err:
        check(signed, "unsigned", **{arg: missing})
    assert isinstance(err.value, InputError)


def test_keyring_without_keys_is_a_config_error(signed, tmp_path):
    empty = tmp_path / "empty.asc"
    empty.write_text("not a key\n")
    with pytest.raises(SignatureConfigError, match=str(empty)):
        check(signed, "gpg_alice", gpg_keyring=empty, gnupg_home_cache=tmp_path / "cache")


@pytest.mark.parametrize("sha", ["--all", "-c", "HEAD", "abc12"])
def test_option_like_or_malformed_sha_is_refused(signed, sha):
    with pytest.raises(InvalidRef, match=repr(sha)):
        verify_commit(signed["repo"], sha, allowed_signers=signed["allowed"])


def test_unknown_commit_names_the_sha(signed):
    with pytest.raises(CommitNotFound, match="f" * 40):
        verify_commit(signed["repo"], "f" * 40)
