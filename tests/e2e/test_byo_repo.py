"""README "Bring your own model repository", followed literally.

The shell blocks marked ``<!-- byo-repo ... -->`` and ``<!-- byo-run ... -->`` are taken from
README.md as they are and run with bash in a fresh folder holding generated images (three
classes of RGB images of mixed sizes and formats: the user's step 1). The only change is the DVC
remote path of the example, replaced by a folder of this test (with a space in its name). The
pipeline then runs on the new repository (``gitops-ml run --local``) and the model it builds is
served by a real ``gitops-ml serve``.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gitops_ml import params
from tests.helpers import readme_block, run_bash

pytestmark = pytest.mark.e2e

EXAMPLE_REMOTE = "/srv/dvc/my-model"
CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_images(images: Path, per_class: int = 16) -> None:
    """Step 1 of the README: the user's images, one folder per class (PNG and JPEG, mixed sizes)."""
    from PIL import Image

    rng = random.Random(7)
    for name, colour in CLASSES.items():
        folder = images / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (rng.randint(20, 48), rng.randint(20, 48))
            pixels = [
                tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour) for _ in range(size[0] * size[1])
            ]
            image = Image.new("RGB", size)
            image.putdata(pixels)
            image.save(folder / (f"{i:03d}.jpg" if i % 2 else f"{i:03d}.png"))


def test_readme_walkthrough_gives_a_served_model(settings, server, tmp_path):
    repo_block = readme_block("byo-repo")
    run_block = readme_block("byo-run")
    assert EXAMPLE_REMOTE in repo_block, f"the README's byo-repo block no longer uses {EXAMPLE_REMOTE}"
    remote = tmp_path / "dvc storage" / "my-model"
    repo_block = repo_block.replace(EXAMPLE_REMOTE, shlex.quote(str(remote)))

    folder = tmp_path / "my-model"
    write_images(folder / "data" / "images")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "GIT_AUTHOR_NAME": "New User",
        "GIT_AUTHOR_EMAIL": "new@example.invalid",
        "GIT_COMMITTER_NAME": "New User",
        "GIT_COMMITTER_EMAIL": "new@example.invalid",
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    env.pop("GITOPS_ML_REPO_URL")  # the README's block exports it

    made = run_bash(repo_block, folder, env, timeout=900)
    assert made.returncode == 0, f"README byo-repo block failed:\n{repo_block}\n{made.stdout}\n{made.stderr}"
    tracked = subprocess.run(["git", "ls-files"], cwd=folder, capture_output=True, text=True, check=True).stdout.split()
    assert "data/images.dvc" in tracked and "params.yaml" in tracked and ".dvc/config" in tracked, tracked
    assert not [p for p in tracked if p.startswith("data/images/")], "images were committed to Git, not DVC"
    assert any(p.is_file() for p in remote.rglob("*")), f"dvc push put nothing in {remote}"
    loaded = params.load(folder)  # the README's params.yaml is valid as written
    assert loaded["image"]["channels"] == 3
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert (
        subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True, check=True).stdout
        == ""
    ), "the README's commands leave files uncommitted"

    ran = run_bash(run_block, folder, env, timeout=900)
    assert ran.returncode == 0, f"README byo-run block failed:\n{run_block}\n{ran.stdout}\n{ran.stderr[-4000:]}"
    result = json.loads(ran.stdout[ran.stdout.index("{") :])
    assert result["commit"]["commit_sha"] == head
    assert result.get("gate_passed") is True, f"the README's example did not pass its own gate: {result}"

    served = server.version()
    assert served is not None, "nothing is served after the README's walkthrough"
    assert served["commit_sha"] == head and sorted(served["class_names"]) == sorted(CLASSES), served
    sample = sorted((folder / "data" / "images" / "green").glob("*.png"))[0]
    response = httpx.post(
        server.url + "/predict", files={"file": (sample.name, sample.read_bytes(), "image/png")}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["class"] in CLASSES
