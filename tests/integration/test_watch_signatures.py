"""The watcher's signature policy end to end: real GPG and SSH keys made here, a real bare remote
reached over ``file://``, signed and unsigned commits pushed to it, ``plan_branch`` deciding per
commit and ``run_requests`` turning the plan into pipeline runs (rejected / warned / trained)."""

import os
import subprocess

import pytest

from gitops_ml import signatures, watch
from gitops_ml.runs import run_requests
from gitops_ml.signatures import SignatureConfigError
from tests.integration.test_signatures import gpg_key, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Alice's GPG and SSH keys are allowed; Mallory's SSH key is not in the allowed signers file."""
    base = tmp_path_factory.mktemp("watch-keys")
    home = base / "gnupg-alice"
    try:
        fpr = gpg_key(home, "Alice <alice@example.com>")
        for name in ("alice", "mallory"):
            run(
                base, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name), "-C", f"{name}@example.com"
            )
        keyring = base / "allowed.asc"
        keyring.write_text(run(base, "gpg", "--armor", "--export", fpr, GNUPGHOME=str(home)))
        allowed = base / "allowed_signers"
        allowed.write_text(f"alice@example.com {(base / 'alice.pub').read_text().strip()}\n")
        ssh_fpr = {n: run(base, "ssh-keygen", "-lf", str(base / f"{n}.pub")).split()[1] for n in ("alice", "mallory")}
        yield {"base": base, "gnupghome": home, "fpr": fpr, "keyring": keyring, "allowed": allowed, "ssh_fpr": ssh_fpr}
    finally:  # key generation and signing start a gpg-agent in the home
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, check=False)


@pytest.fixture
def remote(tmp_path):
    """A bare remote with one commit (params.yaml) on main, and a work clone that pushes to it."""
    bare = tmp_path / "remotes" / "models.git"
    bare.parent.mkdir()
    run(tmp_path, "git", "init", "--bare", "-q", "-b", "main", str(bare))
    work = tmp_path / "work"
    run(tmp_path, "git", "init", "-q", "-b", "main", str(work))
    for key, value in (("user.name", "Alice"), ("user.email", "alice@example.com"), ("commit.gpgsign", "false")):
        run(work, "git", "config", key, value)
    run(work, "git", "remote", "add", "origin", str(bare))
    (work / "params.yaml").write_text("train: {epochs: 1}\n")
    run(work, "git", "add", "params.yaml")
    run(work, "git", "commit", "-qm", "base")
    run(work, "git", "push", "-q", "origin", "main")
    return {
        "bare": bare,
        "work": work,
        "url": f"file://{bare}",
        "base": run(work, "git", "rev-parse", "HEAD"),
        "cache": tmp_path / "cache",
        "n": 0,
    }


def push(remote, keys, kind: str) -> str:
    """Commit a change of params.yaml signed as ``kind`` (unsigned, gpg_alice, ssh_alice, ssh_mallory), push it."""
    remote["n"] += 1
    work = remote["work"]
    (work / "params.yaml").write_text(f"train: {{epochs: {remote['n'] + 1}}}  # {kind}\n")
    run(work, "git", "add", "params.yaml")
    sign, env = {
        "unsigned": ([], {}),
        "gpg_alice": (
            ["-c", "gpg.program=gpg", "-c", f"user.signingkey={keys['fpr']}"],
            {"GNUPGHOME": str(keys["gnupghome"])},
        ),
        "ssh_alice": (["-c", "gpg.format=ssh", "-c", f"user.signingkey={keys['base'] / 'alice.pub'}"], {}),
        "ssh_mallory": (["-c", "gpg.format=ssh", "-c", f"user.signingkey={keys['base'] / 'mallory.pub'}"], {}),
    }[kind]
    run(work, "git", *sign, "commit", "-q", *(["-S"] if sign else []), "-m", f"{kind} change", **env)
    sha = run(work, "git", "rev-parse", "HEAD")
    header = run(work, "git", "cat-file", "commit", sha).split("\n\n", 1)[0]
    assert ("\ngpgsig " in header) == (kind != "unsigned"), header  # the commit is what it claims to be
    run(work, "git", "push", "-q", "origin", "main")
    return sha


def make_watch(remote, keys, **kw) -> watch.Watch:
    kw.setdefault("allowed_signers", str(keys["allowed"]))
    kw.setdefault("gpg_keyring", str(keys["keyring"]))
    return watch.Watch(name="signed", repo_url=remote["url"], branch="main", paths=("params.yaml",), **kw)


BURST = ("unsigned", "gpg_alice", "ssh_alice", "ssh_mallory")


def test_enforce_rejects_unsigned_and_unknown_signers_and_trains_allowed(remote, keys):
    shas = {kind: push(remote, keys, kind) for kind in BURST}
    plan = watch.plan_branch(make_watch(remote, keys, signatures="enforce"), remote["cache"], remote["base"])

    assert plan.head_sha == shas["ssh_mallory"] and plan.force_push is None
    assert [d.commit_sha for d in plan.decisions] == [shas[k] for k in BURST]
    assert [d.action for d in plan.decisions] == ["rejected", "train", "train", "rejected"]
    by_kind = dict(zip(BURST, plan.decisions, strict=True))
    unsigned, mallory = shas["unsigned"], shas["ssh_mallory"]
    assert by_kind["unsigned"].reason == f"signature policy enforce: commit {unsigned} is not signed"
    assert by_kind["ssh_mallory"].reason == (
        f"signature policy enforce: commit {mallory} is signed by SSH key {keys['ssh_fpr']['mallory']} "
        f"which is not in the allowed signers file {keys['allowed']}"
    )
    for kind in BURST:
        assert by_kind[kind].changed_paths == ("params.yaml",) and by_kind[kind].warning is None
    assert by_kind["gpg_alice"].reason == by_kind["ssh_alice"].reason == "changed params.yaml"

    requests = {r["conf"]["commit_sha"]: r for r in run_requests("signed", "main", plan.to_dict(), trigger="push")}
    assert set(requests) == set(shas.values())  # every commit shows up under its SHA
    for kind, sha in shas.items():
        conf, note = requests[sha]["conf"], requests[sha]["note"]
        assert requests[sha]["trigger_run_id"] == f"commit__{sha}__signed"
        assert (conf["commit_sha"], conf["watch"], conf["branch"], conf["trigger"]) == (sha, "signed", "main", "push")
        assert "signature_warning" not in conf and "WARNING" not in note
        if kind in ("unsigned", "ssh_mallory"):
            assert conf["decision"] == "rejected" and conf["reason"] == by_kind[kind].reason
            assert note.startswith("REJECTED") and by_kind[kind].reason in note
        else:
            assert conf["decision"] == "train" and not note.startswith("REJECTED")
    assert [r["conf"]["commit_sha"] for r in requests.values() if r["conf"]["decision"] == "train"] == [
        shas["gpg_alice"],
        shas["ssh_alice"],
    ]


def test_warn_trains_everything_and_flags_unverified_commits(remote, keys):
    shas = {kind: push(remote, keys, kind) for kind in BURST}
    plan = watch.plan_branch(make_watch(remote, keys, signatures="warn"), remote["cache"], remote["base"])

    assert [d.commit_sha for d in plan.decisions] == [shas[k] for k in BURST]
    assert [d.action for d in plan.decisions] == ["train"] * 4
    by_kind = dict(zip(BURST, plan.decisions, strict=True))
    assert by_kind["unsigned"].warning == f"commit {shas['unsigned']} is not signed"
    assert by_kind["ssh_mallory"].warning == (
        f"commit {shas['ssh_mallory']} is signed by SSH key {keys['ssh_fpr']['mallory']} "
        f"which is not in the allowed signers file {keys['allowed']}"
    )
    assert by_kind["gpg_alice"].warning is None and by_kind["ssh_alice"].warning is None

    requests = {r["conf"]["commit_sha"]: r for r in run_requests("signed", "main", plan.to_dict(), trigger="push")}
    assert set(requests) == set(shas.values())
    for kind, sha in shas.items():
        conf, note = requests[sha]["conf"], requests[sha]["note"]
        assert conf["decision"] == "train" and not note.startswith("REJECTED")
        if kind in ("unsigned", "ssh_mallory"):
            assert conf["signature_warning"] == by_kind[kind].warning
            assert "WARNING" in note and by_kind[kind].warning in note
        else:
            assert "signature_warning" not in conf and "WARNING" not in note


def test_enforce_latest_a_rejected_newest_commit_does_not_supersede_a_signed_one(remote, keys):
    signed = push(remote, keys, "ssh_alice")
    unsigned = push(remote, keys, "unsigned")
    plan = watch.plan_branch(
        make_watch(remote, keys, signatures="enforce", policy="latest"), remote["cache"], remote["base"]
    )

    assert plan.head_sha == unsigned
    assert [(d.commit_sha, d.action) for d in plan.decisions] == [(signed, "train"), (unsigned, "rejected")]
    assert plan.decisions[0].superseded_by is None
    assert plan.decisions[1].reason == f"signature policy enforce: commit {unsigned} is not signed"
    requests = run_requests("signed", "main", plan.to_dict(), trigger="push")
    assert [(r["conf"]["commit_sha"], r["conf"]["decision"]) for r in requests] == [
        (signed, "train"),
        (unsigned, "rejected"),
    ]
    assert requests[1]["note"].startswith("REJECTED")


def test_off_trains_unsigned_commits_without_verifying(remote, keys, tmp_path, monkeypatch):
    sha = push(remote, keys, "unsigned")
    nowhere = tmp_path / "does-not-exist"
    off = make_watch(
        remote,
        keys,
        signatures="off",
        allowed_signers=str(nowhere / "allowed_signers"),
        gpg_keyring=str(nowhere / "keys.asc"),
    )
    # The same missing files are a configuration error as soon as a policy checks signatures ...
    with pytest.raises(SignatureConfigError, match=str(nowhere)):
        watch.plan_branch(
            make_watch(
                remote, keys, signatures="warn", allowed_signers=off.allowed_signers, gpg_keyring=off.gpg_keyring
            ),
            remote["cache"],
            remote["base"],
        )
    # ... but "off" never looks at them, nor at the commit's signature.
    calls = []
    monkeypatch.setattr(signatures, "verify_commit", lambda *a, **kw: calls.append(a) or pytest.fail("verified"))
    plan = watch.plan_branch(off, remote["cache"], remote["base"])
    assert calls == []
    assert [(d.commit_sha, d.action, d.warning) for d in plan.decisions] == [(sha, "train", None)]
    [request] = run_requests("signed", "main", plan.to_dict(), trigger="push")
    assert request["conf"]["decision"] == "train" and "signature_warning" not in request["conf"]
    assert not (remote["cache"] / "gnupg").exists()  # no keyring was imported


@pytest.fixture
def enforced(remote, keys, tmp_path, monkeypatch):
    """A watch configuration file enforcing signatures on ``remote``, and settings for a run of it."""
    import yaml

    from gitops_ml.config import Settings

    config = tmp_path / "watch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repositories": [
                    {
                        "name": "signed",
                        "repo_url": remote["url"],
                        "branch": "main",
                        "signatures": "enforce",
                        "allowed_signers": str(keys["allowed"]),
                        "gpg_keyring": str(keys["keyring"]),
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    home = tmp_path / "home"
    return Settings(
        home=home,
        repo_url=remote["url"],
        branch="main",
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        artifact_root=str(home / "artifacts"),
    )


def test_resolve_rechecks_enforced_signatures_on_every_trigger_path(remote, keys, enforced):
    """A manual, REST, CLI or UI run (no watcher decision, any conf) of an unsigned commit is REJECTED
    at resolve_commit, before anything is checked out; an allowed signature resolves."""
    from gitops_ml import pipeline
    from gitops_ml.errors import SignatureRejected

    unsigned, mallory, alice = (push(remote, keys, k) for k in ("unsigned", "ssh_mallory", "ssh_alice"))
    for sha, why in ((unsigned, "is not signed"), (mallory, "not in the allowed signers file")):
        for watch_name in (None, "signed"):  # conf without a watch (manual/REST/CLI) and with it
            with pytest.raises(SignatureRejected, match=f"REJECTED commit {sha}: signature policy enforce.*{why}"):
                pipeline.resolve(enforced, sha, watch_name)
    assert not (enforced.home / "work").exists(), "nothing of a rejected commit was checked out"
    resolved = pipeline.resolve(enforced, alice)
    assert resolved.commit.commit_sha == alice and resolved.signature_warning is None


def test_run_conf_cannot_point_around_an_enforcing_watch(remote, keys, enforced, tmp_path):
    """With a watch enforcing signatures, a run conf naming an unwatched repository is refused."""
    from gitops_ml import pipeline
    from gitops_ml.watch import WatchConfigError

    other = tmp_path / "other.git"
    run(tmp_path, "git", "clone", "-q", "--bare", str(remote["bare"]), str(other))
    with pytest.raises(WatchConfigError, match="is not watched, and watch\\(es\\) signed enforce commit signatures"):
        pipeline.resolve(enforced.with_overrides(repo_url=f"file://{other}"), None)
    with pytest.raises(WatchConfigError, match="is not watched"):
        pipeline.resolve(enforced.with_overrides(branch="other"), None)
