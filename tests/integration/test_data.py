"""DVC against a real local remote: pull at a commit, hash verification, layout checks."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from gitops_ml import data
from gitops_ml.errors import DataError
from tests.helpers import git


def make_images(root, classes=("cat", "dog", "eel")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(4):
            size = (10 + i, 12 + c)
            if i % 2:
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.jpg")
            else:
                Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), "L").save(folder / f"{i}.png")


@pytest.fixture
def tracked(tmp_path):
    """A git repo with data/images tracked by DVC and pushed to a real local remote, plus a clone."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    make_images(origin / "data" / "images")
    data_hash = data.track_and_push(origin, "data/images", "storage", str(tmp_path / "remote"))
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "data")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    return {
        "origin": origin,
        "clone": clone,
        "remote": tmp_path / "remote",
        "cache": tmp_path / "cache",
        "data_hash": data_hash,
    }


def remote_object(remote, md5):
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def manifest(tracked):
    import json

    return json.loads(remote_object(tracked["remote"], tracked["data_hash"] + ".dir").read_text())


def test_pull_verifies_and_indexes_mixed_images(tracked):
    snapshot = data.pull(tracked["clone"], "data/images", tracked["cache"])
    assert snapshot.data_hash == tracked["data_hash"] and snapshot.nfiles == 12
    index = data.scan_images(snapshot.path)
    assert index.class_names == ["cat", "dog", "eel"]
    assert sorted(set(index.labels)) == [0, 1, 2] and len(index.files) == 12


def test_missing_object_in_remote_is_named(tracked):
    entry = manifest(tracked)[0]
    remote_object(tracked["remote"], entry["md5"]).unlink()
    with pytest.raises(DataError, match=f"missing from remote 'storage': data/images/{entry['relpath']}"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_corrupted_object_fails_hash_check_and_is_evicted(tracked):
    entry = manifest(tracked)[1]
    obj = remote_object(tracked["remote"], entry["md5"])
    obj.chmod(0o644)
    obj.write_bytes(b"not what was committed")
    with pytest.raises(DataError, match=f"data/images/{entry['relpath']} does not match its DVC hash"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])
    assert not remote_object(tracked["cache"], entry["md5"]).exists()


def test_no_remote_configured_is_named(tracked):
    (tracked["clone"] / ".dvc" / "config").write_text("")
    with pytest.raises(DataError, match=re.escape("no default DVC remote configured for data/images.dvc")):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_missing_pointer_is_named(tracked):
    (tracked["clone"] / "data" / "images.dvc").unlink()
    with pytest.raises(DataError, match=re.escape("DVC pointer data/images.dvc not found")):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_empty_class_folder_and_non_image_are_named(tmp_path):
    root = tmp_path / "images"
    make_images(root)
    (root / "fox").mkdir()
    with pytest.raises(DataError, match="class folder data/images/fox has no images"):
        data.scan_images(root)
    shutil.rmtree(root / "fox")
    (root / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=re.escape("data/images/dog/notes.txt is not an image")):
        data.scan_images(root)
    (root / "dog" / "notes.txt").unlink()
    (root / "dog" / "fake.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=re.escape("data/images/dog/fake.png is not a readable image")):
        data.scan_images(root)
