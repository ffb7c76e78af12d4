import pytest

from gitops_ml import source
from gitops_ml.errors import CommitNotFound, CommitNotOnBranch, GitopsMLError, InvalidRef
from tests.helpers import commit_file, git


@pytest.mark.parametrize(
    "branch",
    [
        "--upload-pack=touch /tmp/x",
        "-b",
        "a..b",
        "a b",
        "x~1",
        "a:b",
        "ref.lock",
        "end/",
        ".hidden",
        "a/.b",
        "",
        "a@{1}",
        "back\\slash",
    ],
)
def test_bad_branch_names_are_refused_before_git(branch):
    with pytest.raises(InvalidRef, match="invalid branch name"):
        source.validate_branch(branch)


@pytest.mark.parametrize("branch", ["main", "feature/new-model", "release-1.2", "user/x_y"])
def test_good_branch_names_pass(branch):
    assert source.validate_branch(branch) == branch


@pytest.mark.parametrize("sha", ["xyz", "12345", "--all", "a" * 41, ""])
def test_bad_shas_are_refused(sha):
    with pytest.raises(InvalidRef, match="invalid commit SHA"):
        source.validate_sha(sha)


def test_credentials_are_stripped_from_urls_and_text():
    assert (
        source.redact_url("https://user:s3cret@git.example.com/org/repo.git") == "https://git.example.com/org/repo.git"
    )
    assert source.redact_url("https://ghp_token@git.example.com/r.git") == "https://git.example.com/r.git"
    assert source.redact_url("/local/path") == "/local/path"
    text = source.redact("fatal: unable to access 'https://bob:hunter2@host/r.git/': failed")
    assert "hunter2" not in text and "bob" not in text and "https://***@host/r.git" in text


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    first = commit_file(path, "a.txt", "one", "first")
    git(path, "checkout", "-qb", "side")
    side = commit_file(path, "b.txt", "side", "side")
    git(path, "checkout", "-q", "main")
    head = commit_file(path, "a.txt", "two", "second")
    return {"path": path, "first": first, "side": side, "head": head}


def test_resolve_head_full_and_abbreviated_sha(repo, tmp_path):
    cache = tmp_path / "cache"
    head = source.resolve_commit(str(repo["path"]), "main", None, cache)
    assert head.commit_sha == repo["head"] and head.message == "second" and head.branch == "main"
    first = source.resolve_commit(str(repo["path"]), "main", repo["first"][:10].upper(), cache)
    assert first.commit_sha == repo["first"]


def test_unknown_sha_and_sha_off_branch_are_named(repo, tmp_path):
    cache = tmp_path / "cache"
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(CommitNotFound, match=f"commit {missing} does not exist"):
        source.resolve_commit(str(repo["path"]), "main", missing, cache)
    with pytest.raises(CommitNotOnBranch, match=f"commit {repo['side']} is not on branch 'main'"):
        source.resolve_commit(str(repo["path"]), "main", repo["side"], cache)
    assert source.resolve_commit(str(repo["path"]), "side", repo["side"], cache).commit_sha == repo["side"]


def test_unknown_branch_fails_with_clear_message(repo, tmp_path):
    with pytest.raises(GitopsMLError, match="branch 'nope' does not exist"):
        source.resolve_commit(str(repo["path"]), "nope", None, tmp_path / "cache")


def test_checkout_is_isolated_and_idempotent(repo, tmp_path):
    cache, work = tmp_path / "cache", tmp_path / "work"
    source.resolve_commit(str(repo["path"]), "main", None, cache)
    first = source.checkout(str(repo["path"]), repo["first"], cache, work)
    head = source.checkout(str(repo["path"]), repo["head"], cache, work)
    assert (first / "a.txt").read_text() == "one" and (head / "a.txt").read_text() == "two"
    (first / "a.txt").write_text("dirty")
    again = source.checkout(str(repo["path"]), repo["first"], cache, work)
    assert again == first and (again / "a.txt").read_text() == "one"


def test_credentials_never_in_errors(tmp_path):
    url = "http://alice:tok_SECRET123@127.0.0.1:9/repo.git"
    with pytest.raises(GitopsMLError) as info:
        source.resolve_commit(url, "main", None, tmp_path / "cache")
    assert "tok_SECRET123" not in str(info.value) and "alice" not in str(info.value)
    assert "127.0.0.1:9/repo.git" in str(info.value)
