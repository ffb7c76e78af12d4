"""Helpers shared by the tests and the benchmarks, free of side effects on import (unlike ``conftest``,
which sets Airflow's environment): a free loopback port, git with a fixed identity, one-file commits,
a data change of the demo repository, the README's shell blocks, GitHub push deliveries,
a task's log as the Airflow UI reads it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's scripts: gitops-ml, airflow, dvc

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    """Run ``git args`` in ``cwd`` with a fixed author and committer; its stripped stdout (raises on failure)."""
    return subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_file(repo: Path, relpath: str, text: str, message: str) -> str:
    """Write ``relpath`` in ``repo``, commit it on the current branch, return the new SHA."""
    (repo / relpath).write_text(text)
    git(repo, "add", relpath)
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def change_demo_images(repo: Path, remote: str, seed: int, message: str) -> str:
    """Rewrite the same three images of the demo repository (two replaced, one added; pixels from ``seed``),
    ``dvc add`` + ``dvc push`` to its ``storage`` remote at ``remote``, commit; the new SHA.  Each such
    commit has four DVC objects of its own (three images, the manifest)."""
    import numpy as np
    from PIL import Image

    from gitops_ml import data

    images = repo / "data" / "images"
    rng = np.random.default_rng(seed)
    for target in (
        sorted((images / "3").glob("0*.png"))[0],
        sorted((images / "5").glob("0*.png"))[0],
        images / "7" / "extra.png",
    ):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(target)
    data.track_and_push(repo, "data/images", "storage", remote)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def readme_block(marker: str) -> str:
    """The ```bash block that follows ``<!-- marker`` in README.md, dedented."""
    text = (ROOT / "README.md").read_text()
    found = re.search(
        rf"<!-- {re.escape(marker)}\b.*?-->\s*\n(?P<indent>[ \t]*)```bash\n(?P<body>.*?)\n[ \t]*```", text, re.S
    )
    assert found, f"README.md has no ```bash block after a <!-- {marker} ... --> comment"
    indent = found.group("indent")
    lines = found.group("body").split("\n")
    return "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines) + "\n"


def run_bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` as a user would paste it (``bash -euo pipefail``); its output captured, never raising."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def push_body(
    before: str,
    after: str,
    ref: str = "refs/heads/main",
    clone_url: str = "https://git.example.com/m.git",
    commits: list[str] | None = None,
) -> bytes:
    """The body of a GitHub push event moving ``ref`` from ``before`` to ``after`` (``commits``: their SHAs)."""
    event: dict = {"ref": ref, "before": before, "after": after, "repository": {"clone_url": clone_url}}
    if commits is not None:
        event["commits"] = [{"id": commit_sha} for commit_sha in commits]
    return json.dumps(event).encode()


def github_push_headers(body: bytes, secret: str, delivery: str | None = None) -> dict[str, str]:
    """The headers GitHub sends with a push event: ``body`` signed with ``secret`` (HMAC-SHA256), the
    delivery id when given."""
    headers = {
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }
    if delivery:
        headers["X-GitHub-Delivery"] = delivery
    return headers


def task_log(client, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list:
    """A task try's log as the Airflow UI reads it (REST ``.../logs/N``, full content): its lines, structured."""
    response = client._http.get(
        f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
        params={"full_content": "true"},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    return response.json()["content"]
