import hashlib
import hmac
import json

import pytest

from gitops_ml import webhooks
from gitops_ml.errors import InputError
from gitops_ml.webhooks import (
    PushEvent,
    WebhookBadRequest,
    WebhookError,
    WebhookTooLarge,
    WebhookUnauthorized,
    authenticate,
    check_headers,
    delivery_id,
    detect_provider,
    parse_push,
)

SECRET = "s3cret-webhook-key"
BEFORE = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
AFTER = "0D1A26E67D8F5EAF1F6BA5C57FC3C7D91AC0FD1C"  # upper case on purpose: returned lower case
SECOND = "b0ce2ebbd8b6a7e2c5b3e3b2b56cd0e0b5a1c9f1"
ZEROS = "0" * 40


def github_payload(**overrides) -> dict:
    payload = {
        "ref": "refs/heads/main",
        "before": BEFORE,
        "after": AFTER,
        "created": False,
        "deleted": False,
        "forced": False,
        "compare": f"https://github.com/acme/digits/compare/{BEFORE[:12]}...{AFTER[:12].lower()}",
        "commits": [
            {
                "id": SECOND,
                "message": "Tune learning rate",
                "timestamp": "2024-05-01T10:00:00Z",
                "author": {"name": "Ada", "email": "ada@example.com"},
                "added": [],
                "removed": [],
                "modified": ["params.yaml"],
            },
            {
                "id": AFTER.lower(),
                "message": "Add more data",
                "timestamp": "2024-05-01T10:05:00Z",
                "author": {"name": "Ada", "email": "ada@example.com"},
                "added": ["data.dvc"],
                "removed": [],
                "modified": [],
            },
        ],
        "head_commit": {"id": AFTER.lower(), "message": "Add more data"},
        "repository": {
            "id": 123456,
            "name": "digits",
            "full_name": "acme/digits",
            "private": True,
            "html_url": "https://github.com/acme/digits",
            "url": "https://api.github.com/repos/acme/digits",
            "git_url": "git://github.com/acme/digits.git",
            "ssh_url": "git@github.com:acme/digits.git",
            "clone_url": "https://x-access-token:ghs_leaky@github.com/acme/digits.git",
            "default_branch": "main",
        },
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": {"login": "ada", "id": 1},
    }
    payload.update(overrides)
    return payload


def gitlab_payload(**overrides) -> dict:
    payload = {
        "object_kind": "push",
        "event_name": "push",
        "before": BEFORE,
        "after": AFTER,
        "ref": "refs/heads/feature/new-model",
        "ref_protected": False,
        "checkout_sha": AFTER,
        "user_username": "ada",
        "project_id": 15,
        "project": {
            "id": 15,
            "name": "digits",
            "path_with_namespace": "acme/digits",
            "web_url": "https://gitlab.example.com/acme/digits",
            "git_ssh_url": "git@gitlab.example.com:acme/digits.git",
            "git_http_url": "https://gitlab.example.com/acme/digits.git",
            "default_branch": "main",
            "homepage": "https://gitlab.example.com/acme/digits",
        },
        "commits": [
            {
                "id": SECOND,
                "message": "Tune learning rate\n",
                "title": "Tune learning rate",
                "timestamp": "2024-05-01T10:00:00+00:00",
                "author": {"name": "Ada", "email": "ada@example.com"},
            },
            {
                "id": AFTER,
                "message": "Add more data\n",
                "title": "Add more data",
                "timestamp": "2024-05-01T10:05:00+00:00",
                "author": {"name": "Ada", "email": "ada@example.com"},
            },
        ],
        "total_commits_count": 2,
        "repository": {
            "name": "digits",
            "url": "git@gitlab.example.com:acme/digits.git",
            "homepage": "https://gitlab.example.com/acme/digits",
            "git_http_url": "https://gitlab.example.com/acme/digits.git",
            "git_ssh_url": "git@gitlab.example.com:acme/digits.git",
        },
    }
    payload.update(overrides)
    return payload


def gitea_payload(**overrides) -> dict:
    payload = {
        "ref": "refs/heads/main",
        "before": BEFORE,
        "after": AFTER,
        "compare_url": "https://gitea.example.com/acme/digits/compare/x...y",
        "commits": [
            {"id": AFTER, "message": "Add more data\n", "url": "https://gitea.example.com/acme/digits/commit/x"}
        ],
        "total_commits": 1,
        "head_commit": {"id": AFTER, "message": "Add more data\n"},
        "repository": {
            "id": 7,
            "name": "digits",
            "full_name": "acme/digits",
            "html_url": "https://gitea.example.com/acme/digits",
            "ssh_url": "ssh://git@gitea.example.com:2222/acme/digits.git",
            "clone_url": "https://gitea.example.com/acme/digits.git",
            "default_branch": "main",
        },
        "pusher": {"login": "ada"},
        "sender": {"login": "ada"},
    }
    payload.update(overrides)
    return payload


def body_of(payload) -> bytes:
    return json.dumps(payload).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-Hub-Signature-256": "sha256=" + sign(body, secret),
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/044aadd",
    }


def gitlab_headers(event: str = "Push Hook", token: str = SECRET) -> dict:
    return {
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": token,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "Content-Type": "application/json",
    }


def gitea_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict:
    # Gitea sends its own headers and GitHub-compatible ones; lower-case names as ASGI servers give them.
    return {
        "x-gitea-event": event,
        "x-gitea-delivery": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
        "x-gitea-signature": sign(body, secret),
        "x-github-event": event,
        "x-hub-signature-256": "sha256=" + sign(body, secret),
        "content-type": "application/json",
    }


# --- good requests --------------------------------------------------------------------------------


def test_github_push():
    body = body_of(github_payload())
    event = parse_push(github_headers(body), body, SECRET)
    assert event == PushEvent(
        provider="github",
        branch="main",
        previous_sha=BEFORE,
        after_sha=AFTER.lower(),
        repo_urls=(
            "https://github.com/acme/digits.git",
            "git@github.com:acme/digits.git",
            "https://github.com/acme/digits",
            "git://github.com/acme/digits.git",
        ),
        commit_shas=(SECOND, AFTER.lower()),
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
    )
    assert not any("ghs_leaky" in url for url in event.repo_urls)


def test_gitlab_push():
    body = body_of(gitlab_payload())
    event = parse_push(gitlab_headers(), body, SECRET)
    assert event.provider == "gitlab"
    assert event.branch == "feature/new-model"
    assert (event.previous_sha, event.after_sha) == (BEFORE, AFTER.lower())
    assert event.repo_urls[:2] == (
        "https://gitlab.example.com/acme/digits.git",
        "git@gitlab.example.com:acme/digits.git",
    )
    assert "https://gitlab.example.com/acme/digits" in event.repo_urls
    assert len(set(event.repo_urls)) == len(event.repo_urls)
    assert event.commit_shas == (SECOND, AFTER.lower())


def test_gitlab_checkout_sha_is_the_fallback_for_after():
    payload = gitlab_payload()
    del payload["after"]
    body = body_of(payload)
    assert parse_push(gitlab_headers(), body, SECRET).after_sha == AFTER.lower()


def test_gitea_push_prefers_gitea_headers():
    body = body_of(gitea_payload())
    headers = gitea_headers(body)
    headers["x-hub-signature-256"] = "sha256=" + "0" * 64  # ignored: the Gitea signature is checked
    event = parse_push(headers, body, SECRET)
    assert event.provider == "gitea"
    assert event.branch == "main"
    assert event.after_sha == AFTER.lower()
    assert event.repo_urls == (
        "https://gitea.example.com/acme/digits.git",
        "ssh://gitea.example.com:2222/acme/digits.git",  # user part stripped by redact_url
        "https://gitea.example.com/acme/digits",
    )
    assert event.commit_shas == (AFTER.lower(),)


def test_forgejo_signature_header():
    body = body_of(gitea_payload())
    headers = {"X-Forgejo-Event": "push", "X-Forgejo-Signature": sign(body)}
    assert parse_push(headers, body, SECRET).provider == "gitea"


def test_header_names_are_case_insensitive():
    body = body_of(github_payload())
    headers = {name.upper(): value for name, value in github_headers(body).items()}
    assert detect_provider(headers) == "github"
    assert authenticate(headers, body, SECRET) == "github"
    assert parse_push(headers, body, SECRET).branch == "main"


def test_detect_provider():
    assert detect_provider({"x-github-event": "push"}) == "github"
    assert detect_provider({"X-Gitlab-Event": "Push Hook"}) == "gitlab"
    assert detect_provider({"X-Gitea-Event": "push", "X-GitHub-Event": "push"}) == "gitea"
    assert detect_provider({"Content-Type": "application/json"}) is None


def test_branch_creation_and_deletion():
    body = body_of(github_payload(before=ZEROS, created=True))
    created = parse_push(github_headers(body), body, SECRET)
    assert created.previous_sha is None and created.after_sha == AFTER.lower()

    body = body_of(github_payload(after=ZEROS, deleted=True, commits=[], head_commit=None))
    deleted = parse_push(github_headers(body), body, SECRET)
    assert deleted.after_sha is None and deleted.previous_sha == BEFORE
    assert deleted.commit_shas == ()


def test_gitlab_branch_deletion_with_null_checkout_sha():
    body = body_of(gitlab_payload(after=ZEROS, checkout_sha=None, commits=[], total_commits_count=0))
    event = parse_push(gitlab_headers(), body, SECRET)
    assert event.after_sha is None


def test_gitea_null_commits_list():
    body = body_of(gitea_payload(after=ZEROS, commits=None, head_commit=None))
    event = parse_push(gitea_headers(body), body, SECRET)
    assert event.after_sha is None and event.commit_shas == ()


# --- events that are not branch pushes -----------------------------------------------------------


def test_pings_and_other_events_are_none():
    ping = body_of({"zen": "Keep it logically awesome.", "hook_id": 1, "hook": {"type": "Repository"}})
    assert parse_push(github_headers(ping, event="ping"), ping, SECRET) is None
    assert parse_push(github_headers(ping, event="pull_request"), ping, SECRET) is None
    assert parse_push(gitea_headers(ping, event="create"), ping, SECRET) is None
    assert parse_push(gitlab_headers(event="Merge Request Hook"), ping, SECRET) is None
    assert parse_push(gitlab_headers(event="Tag Push Hook"), ping, SECRET) is None


def test_non_push_events_are_still_authenticated():
    ping = b'{"zen": "x"}'
    with pytest.raises(WebhookUnauthorized):
        parse_push(github_headers(ping, event="ping", secret="other"), ping, SECRET)


def test_tag_push_is_none():
    body = body_of(github_payload(ref="refs/tags/v1.0.0"))
    assert parse_push(github_headers(body), body, SECRET) is None


# --- authentication failures ----------------------------------------------------------------------


def unauthorized(headers, body, secret=SECRET) -> str:
    with pytest.raises(WebhookUnauthorized) as info:
        parse_push(headers, body, secret)
    assert info.value.status_code == 401
    assert isinstance(info.value, WebhookError) and isinstance(info.value, InputError)
    message = str(info.value)
    assert "\n" not in message
    if secret:
        assert secret not in message
    for value in headers.values():  # neither the received signature nor token is echoed
        if len(value) >= 40:
            assert value not in message and value.removeprefix("sha256=") not in message
    return message


def test_github_wrong_signature():
    body = body_of(github_payload())
    assert "X-Hub-Signature-256" in unauthorized(github_headers(body, secret="not-the-secret"), body)


def test_github_signature_of_another_body():
    body = body_of(github_payload())
    headers = github_headers(body)
    tampered = body_of(github_payload(ref="refs/heads/evil"))
    assert "X-Hub-Signature-256" in unauthorized(headers, tampered)


def test_github_missing_signature():
    body = body_of(github_payload())
    headers = github_headers(body)
    del headers["X-Hub-Signature-256"]
    assert "missing X-Hub-Signature-256" in unauthorized(headers, body)


def test_github_sha1_signature_alone_is_refused():
    body = body_of(github_payload())
    headers = {
        "X-GitHub-Event": "push",
        "X-Hub-Signature": "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest(),
    }
    assert "X-Hub-Signature-256" in unauthorized(headers, body)


def test_github_signature_without_prefix_is_refused():
    body = body_of(github_payload())
    headers = github_headers(body)
    headers["X-Hub-Signature-256"] = sign(body)
    unauthorized(headers, body)


def test_gitlab_wrong_and_missing_token():
    body = body_of(gitlab_payload())
    assert "X-Gitlab-Token" in unauthorized(gitlab_headers(token="guess"), body)
    assert "X-Gitlab-Token" in unauthorized(gitlab_headers(token=SECRET + "x"), body)
    headers = gitlab_headers()
    del headers["X-Gitlab-Token"]
    assert "missing X-Gitlab-Token" in unauthorized(headers, body)


def test_gitea_wrong_and_missing_signature():
    body = body_of(gitea_payload())
    assert "X-Gitea-Signature" in unauthorized(gitea_headers(body, secret="nope"), body)
    headers = {"X-Gitea-Event": "push"}
    assert "missing X-Gitea-Signature" in unauthorized(headers, body)


def test_unknown_provider_and_non_ascii_signature():
    body = body_of(github_payload())
    assert "unrecognised webhook" in unauthorized({"Content-Type": "application/json"}, body)
    headers = github_headers(body)
    headers["X-Hub-Signature-256"] = "sha256=ä" + "0" * 63
    unauthorized(headers, body)


def test_empty_secret_refuses_everything():
    body = body_of(github_payload())
    message = unauthorized(github_headers(body, secret=""), body, secret="")
    assert "secret" in message
    with pytest.raises(WebhookUnauthorized):
        parse_push(gitlab_headers(token=""), body, "")


def test_authentication_comes_before_json_parsing():
    body = b"{not json"
    with pytest.raises(WebhookUnauthorized):
        parse_push(github_headers(body, secret="other"), body, SECRET)
    with pytest.raises(WebhookBadRequest):
        parse_push(github_headers(body), body, SECRET)


# --- bad requests (authenticated) ----------------------------------------------------------------


def bad_request(body: bytes) -> str:
    with pytest.raises(WebhookBadRequest) as info:
        parse_push(github_headers(body), body, SECRET)
    assert info.value.status_code == 400
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    return message


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "JSON"),
        (b"\xff\xfe\x00garbage", "JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (body_of({k: v for k, v in github_payload().items() if k != "ref"}), "'ref'"),
        (body_of(github_payload(ref=42)), "'ref'"),
        (body_of(github_payload(ref="refs/remotes/origin/main")), "'ref'"),
        (body_of(github_payload(ref="refs/heads/")), "'ref'"),
        (body_of(github_payload(ref="refs/heads/--upload-pack=x")), "'ref'"),
        (body_of(github_payload(ref="refs/heads/a..b")), "'ref'"),
        (body_of(github_payload(ref="refs/heads/x\nInjected: 1")), "'ref'"),
        (body_of(github_payload(ref="refs/heads/" + "a" * 5000)), "'ref'"),
        (body_of(github_payload(after="not-a-sha")), "'after'"),
        (body_of(github_payload(after=AFTER[:12])), "'after'"),
        (body_of(github_payload(after=None)), "'after'"),
        (body_of(github_payload(before="--output=/tmp/x" + "0" * 25)), "'before'"),
        (body_of(github_payload(commits="abc")), "'commits'"),
        (body_of(github_payload(commits=[{"id": "zz"}])), "'commits[0].id'"),
    ],
)
def test_bad_payloads(body, field):
    assert field in bad_request(body)


def test_option_like_branch_message():
    message = bad_request(body_of(github_payload(ref="refs/heads/--upload-pack=x")))
    assert "'ref'" in message and "option" in message


def test_gitlab_without_after_or_checkout_sha():
    payload = gitlab_payload(checkout_sha=None)
    del payload["after"]
    with pytest.raises(WebhookBadRequest, match="checkout_sha"):
        parse_push(gitlab_headers(), body_of(payload), SECRET)


def test_missing_event_header_is_a_bad_request():
    body = body_of(github_payload())
    headers = github_headers(body)
    del headers["X-GitHub-Event"]
    with pytest.raises(WebhookBadRequest, match="X-GitHub-Event"):
        parse_push(headers, body, SECRET)


def test_oversized_body_is_413():
    payload = github_payload()
    payload["padding"] = "x" * webhooks.MAX_BODY_BYTES
    body = body_of(payload)
    with pytest.raises(WebhookTooLarge) as info:
        parse_push(github_headers(body), body, SECRET)
    assert info.value.status_code == 413
    assert "5 MB" in str(info.value)


# --- before the body is read ---------------------------------------------------------------------


def test_check_headers_refuses_before_any_body_byte():
    body = body_of(github_payload())
    assert check_headers(github_headers(body), SECRET) == "github"  # only the header's presence is checked
    assert check_headers(gitea_headers(body), SECRET) == "gitea"
    assert check_headers(gitlab_headers(), SECRET) == "gitlab"
    refusals = [
        ({"X-GitHub-Event": "push"}, WebhookUnauthorized, "missing X-Hub-Signature-256"),
        ({"X-GitHub-Event": "push", "X-Hub-Signature": "sha1=00"}, WebhookUnauthorized, "SHA-1"),
        ({"x-gitea-event": "push"}, WebhookUnauthorized, "missing X-Gitea-Signature"),
        (gitlab_headers(token="wrong"), WebhookUnauthorized, "X-Gitlab-Token header does not match"),
        ({"Content-Type": "application/json"}, WebhookUnauthorized, "unrecognised webhook"),
        ({**github_headers(body), "Content-Length": str(webhooks.MAX_BODY_BYTES + 1)}, WebhookTooLarge, "5 MB"),
        ({**github_headers(body), "Content-Length": "12abc"}, WebhookBadRequest, "Content-Length"),
        ({**github_headers(body), "Content-Length": "٣"}, WebhookBadRequest, "Content-Length"),
    ]
    for headers, error, message in refusals:
        with pytest.raises(error, match=message):
            check_headers(headers, SECRET)
    with pytest.raises(WebhookUnauthorized, match="no webhook secret"):
        check_headers(github_headers(body), "")
    assert check_headers({**github_headers(body), "Content-Length": str(webhooks.MAX_BODY_BYTES)}, SECRET)


def test_delivery_ids():
    body = body_of(github_payload())
    assert delivery_id(github_headers(body)) == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert delivery_id(gitea_headers(body)) == "f6266f16-1bf3-46a5-9ea4-602e06ead473"
    assert (
        delivery_id({**gitlab_headers(), "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e"})
        == "13792a34-cac6-4fda-95a8-c58e00a3954e"
    )
    assert delivery_id(gitlab_headers()) is None
    assert parse_push(github_headers(body), body, SECRET).delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    for bad in ("../../etc", "a b", "x" * 101, "", "٣"):
        with pytest.raises(WebhookBadRequest, match="X-GitHub-Delivery"):
            delivery_id({**github_headers(body), "X-GitHub-Delivery": bad})
