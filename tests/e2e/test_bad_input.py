"""Bad commits fail at the first step that can see them, name the culprit, and change nothing.

Setup: a real demo repository with a real DVC remote, a champion trained from its
first commit and served by a real ``gitops-ml serve`` process.  Each case makes a
real bad commit (or asks for a bad SHA) and runs the pipeline on it.
"""

import shutil

import pytest
import yaml

from gitops_ml import data, flow, pipeline, registry
from gitops_ml.errors import CommitNotFound, CommitNotOnBranch, DataError, DeployError, ParamsError
from tests.helpers import commit_file, git

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployed(settings, demo_repo, server):
    result = flow.run_local(settings, demo_repo["commit_sha"])
    assert result.deploy.serving[settings.serving_url]["commit_sha"] == demo_repo["commit_sha"]
    return result


def state(settings, server):
    versions = registry.client(settings).search_model_versions(f"name = '{settings.model_name}'")
    champion = registry.get_alias(settings)
    return (
        sorted(str(v.version) for v in versions),
        str(champion.version) if champion else None,
        server.version()["model_version"],
    )


def commit_data_change(repo, change, message):
    change(repo / "data" / "images")
    data.track_and_push(repo, "data/images", "storage", _remote_url(repo))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def _remote_url(repo):
    import configparser

    parser = configparser.ConfigParser()
    parser.read(repo / ".dvc" / "config")
    return parser["'remote \"storage\"'"]["url"]


def remote_object(remote, md5):
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def new_image_md5(repo, relpath):
    import hashlib

    return hashlib.md5((repo / "data" / "images" / relpath).read_bytes()).hexdigest()


def test_bad_commits_change_nothing(settings, demo_repo, server, deployed):
    repo, remote = demo_repo["path"], demo_repo["remote"]
    before = state(settings, server)
    assert before[1] == before[2] == deployed.model_version
    cases = []

    # 1. A SHA that does not exist.
    missing = "deadbeef" * 5
    cases.append((missing, CommitNotFound, f"commit {missing} does not exist"))

    # 2. A SHA that is not on the tracked branch.
    git(repo, "checkout", "-qb", "experiment")
    side = commit_file(repo, "EXPERIMENT.md", "side branch\n", "side")
    git(repo, "checkout", "-q", "main")
    cases.append((side, CommitNotOnBranch, f"commit {side} is not on branch 'main'"))

    # 3. params.yaml with a wrong type, then with a missing key.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = "many"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git(repo, "commit", "-qam", "wrong type")
    cases.append((git(repo, "rev-parse", "HEAD"), ParamsError, "params.yaml: train.epochs must be an integer"))
    params["train"]["epochs"] = 3
    del params["image"]["height"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    git(repo, "commit", "-qam", "missing key")
    cases.append((git(repo, "rev-parse", "HEAD"), ParamsError, "missing required key image.height"))
    git(repo, "revert", "--no-edit", "HEAD", "HEAD~1")

    # 4. A file that is not an image, pushed with DVC.
    sha = commit_data_change(repo, lambda d: (d / "3" / "README.txt").write_text("notes"), "add notes")
    cases.append((sha, DataError, "data/images/3/README.txt is not an image"))
    git(repo, "revert", "--no-edit", "HEAD")
    (repo / "data" / "images" / "3" / "README.txt").unlink()  # the git-ignored work tree follows the revert

    # 5. A class folder with no images (only a hidden placeholder).
    sha = commit_data_change(
        repo, lambda d: ((d / "letters").mkdir(), (d / "letters" / ".keep").write_text("")), "add empty class"
    )
    cases.append((sha, DataError, "class folder data/images/letters has no images"))
    git(repo, "revert", "--no-edit", "HEAD")
    shutil.rmtree(repo / "data" / "images" / "letters")

    # 6. A DVC object missing from the remote.
    def add_copy(d):
        shutil.copy(d / "7" / sorted(p.name for p in (d / "7").iterdir())[0], d / "7" / "extra.png")
        (d / "7" / "extra.png").write_bytes((d / "7" / "extra.png").read_bytes() + b"\0")

    sha = commit_data_change(repo, add_copy, "add one image")
    remote_object(remote, new_image_md5(repo, "7/extra.png")).unlink()
    cases.append((sha, DataError, "missing from remote 'storage': data/images/7/extra.png"))

    # 7. Data that does not match its DVC hash (the remote object was altered).
    def add_other(d):
        (d / "7" / "extra2.png").write_bytes((d / "7" / "extra.png").read_bytes() + b"\1")
        (d / "7" / "extra.png").unlink()

    sha = commit_data_change(repo, add_other, "add another image")
    obj = remote_object(remote, new_image_md5(repo, "7/extra2.png"))
    obj.chmod(0o644)
    obj.write_bytes(b"tampered")
    cases.append((sha, DataError, "data/images/7/extra2.png does not match its DVC hash"))

    # 8. A missing DVC remote.
    config = repo / ".dvc" / "config"
    config.write_text("[core]\n    autostage = false\n")
    git(repo, "commit", "-qam", "drop the DVC remote")
    cases.append((git(repo, "rev-parse", "HEAD"), DataError, "no default DVC remote configured"))

    for commit_sha, error, message in cases:
        with pytest.raises(error) as info:
            flow.run_local(settings, commit_sha)
        assert message in str(info.value), f"{commit_sha}: {info.value}"
        assert commit_sha[:7] in str(info.value) or error is CommitNotFound
        assert state(settings, server) == before, f"state changed by bad commit {commit_sha}"


def test_failed_deploy_rolls_back_alias_and_server(settings, demo_repo, server, deployed):
    from gitops_ml import demo

    new_sha = demo.bump_param(demo_repo["path"], "train.epochs", 2, "fewer epochs")
    challenger = flow.run_local(settings, new_sha, deploy_model=False)
    version = registry.get_version(settings, challenger.model_version)
    # A real fault: the new version's artifacts vanish from the artifact store before the deploy.
    store = settings.home / "mlflow" / "artifacts"
    model_dirs = [p for p in store.rglob("MLmodel") if version.source.rsplit("/", 1)[-1] in str(p)]
    assert model_dirs, "logged model not found in the artifact store"
    shutil.rmtree(model_dirs[0].parent)
    # The server loads the run's code-free serving artifact first: it vanishes too.
    serving = [p for p in store.rglob(registry.SERVING_ARTIFACT) if version.run_id in str(p)]
    assert serving, "serving artifact not found in the artifact store"
    shutil.rmtree(serving[0])
    with pytest.raises(
        DeployError,
        match=f"deploy of model version {challenger.model_version}.*rolled back to version {deployed.model_version}",
    ):
        pipeline.deploy(settings, challenger.commit, challenger.model_version, {})
    assert str(registry.get_alias(settings).version) == deployed.model_version
    assert server.version()["commit_sha"] == demo_repo["commit_sha"]
