"""A commit cannot make ``pull`` write outside its work tree (real Git clone, real DVC remote).

Each case is a commit an attacker could push: a symlink on the way to the data folder or
inside it, a DVC manifest or pointer that names a path outside, a ``.dvc/config`` that asks
for links into the cache or another site cache.  Every case must fail with an error naming
the offending path, and the folder outside must stay empty.
"""

import hashlib
import io
import json
import os
import re

import pytest
import yaml
from PIL import Image

from gitops_ml import data
from gitops_ml.errors import DataError
from tests.integration.test_data import remote_object, tracked  # noqa: F401 - fixture


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def assert_untouched(folder):
    assert list(folder.rglob("*")) == [], f"files were written outside the work tree: {list(folder.rglob('*'))}"


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    return buf.getvalue()


def put_object(remote, payload: bytes, suffix: str = "") -> str:
    md5 = hashlib.md5(payload).hexdigest()
    path = remote_object(remote, md5 + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return md5


def craft_manifest(tracked, entries: list[dict]) -> str:
    """Store a directory manifest with ``entries`` in the remote and point data/images.dvc at it."""
    raw = json.dumps(entries).encode()
    dir_md5 = put_object(tracked["remote"], raw, ".dir") + ".dir"
    pointer = tracked["clone"] / "data" / "images.dvc"
    content = yaml.safe_load(pointer.read_text())
    content["outs"][0]["md5"] = dir_md5
    pointer.write_text(yaml.safe_dump(content))
    return dir_md5


@pytest.mark.parametrize(
    "relpath",
    [
        "../../escaped.png",
        "cat/../../../escaped.png",
        "/ABS/escaped.png",
        "cat//x.png",
        "./cat/x.png",
        "cat\\..\\..\\escaped.png",
    ],
)
def test_manifest_entry_outside_the_folder_is_refused_before_writing(tracked, outside, relpath):
    md5 = put_object(tracked["remote"], png_bytes())
    relpath = relpath.replace("/ABS", str(outside))
    craft_manifest(tracked, [{"md5": md5, "relpath": "cat/ok.png"}, {"md5": md5, "relpath": relpath}])
    with pytest.raises(DataError, match="would be written outside data/images"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])
    assert not (tracked["clone"] / "escaped.png").exists() and not (tracked["clone"].parent / "escaped.png").exists()
    assert_untouched(outside)
    assert not (tracked["clone"] / "data" / "images" / "cat" / "ok.png").exists(), "nothing is checked out"


def test_manifest_md5_that_is_a_path_is_refused(tracked):
    craft_manifest(tracked, [{"md5": "../../../../../escaped", "relpath": "cat/x.png"}])
    with pytest.raises(DataError, match="32-hex 'md5'"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])
    assert not any(p.name == "escaped" for p in tracked["clone"].parent.rglob("escaped"))


def test_case_folding_collision_is_refused(tracked):
    md5 = put_object(tracked["remote"], png_bytes())
    craft_manifest(tracked, [{"md5": md5, "relpath": "cat/X.png"}, {"md5": md5, "relpath": "cat/x.png"}])
    with pytest.raises(DataError, match=re.escape("collides with data/images/cat/X.png")):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_file_that_is_also_a_folder_is_refused(tracked):
    md5 = put_object(tracked["remote"], png_bytes())
    craft_manifest(tracked, [{"md5": md5, "relpath": "cat"}, {"md5": md5, "relpath": "cat/x.png"}])
    with pytest.raises(DataError, match="both a file and the folder"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_symlink_as_data_path_is_refused(tracked, outside):
    clone = tracked["clone"]
    os.symlink(outside, clone / "imgs")
    pointer = yaml.safe_load((clone / "data" / "images.dvc").read_text())
    pointer["outs"][0]["path"] = "imgs"
    (clone / "imgs.dvc").write_text(yaml.safe_dump(pointer))
    with pytest.raises(DataError, match=re.escape("data.path 'imgs': imgs is a symbolic link")):
        data.pull(clone, "imgs", tracked["cache"])
    assert_untouched(outside)


def test_symlink_on_the_way_to_data_path_is_refused(tracked, outside):
    clone = tracked["clone"]
    os.symlink(outside, clone / "link")
    (outside / "images.dvc").write_text((clone / "data" / "images.dvc").read_text())
    before = sorted(outside.iterdir())
    with pytest.raises(DataError, match="link is a symbolic link"):
        data.pull(clone, "link/images", tracked["cache"])
    assert sorted(outside.iterdir()) == before


def test_symlink_inside_the_data_folder_is_refused(tracked, outside):
    clone = tracked["clone"]
    (clone / "data" / "images" / "cat").mkdir(parents=True)
    os.symlink(outside, clone / "data" / "images" / "cat" / "more")
    with pytest.raises(DataError, match="data/images/cat/more is a symbolic link"):
        data.pull(clone, "data/images", tracked["cache"])
    assert_untouched(outside)


def test_pointer_naming_another_output_path_is_refused(tracked, outside):
    pointer_file = tracked["clone"] / "data" / "images.dvc"
    pointer = yaml.safe_load(pointer_file.read_text())
    pointer["outs"][0]["path"] = os.path.relpath(outside / "images", pointer_file.parent)
    pointer_file.write_text(yaml.safe_dump(pointer))
    with pytest.raises(DataError, match=r"outs\[0\].path must be 'images'"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])
    assert_untouched(outside)


def test_pointer_with_import_or_stage_keys_is_refused(tracked):
    pointer_file = tracked["clone"] / "data" / "images.dvc"
    pointer = yaml.safe_load(pointer_file.read_text())
    pointer["deps"] = [{"path": "https://example.invalid/images", "repo": {"url": "https://example.invalid/x"}}]
    pointer_file.write_text(yaml.safe_dump(pointer))
    with pytest.raises(DataError, match=r"unsupported key.*deps"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])


def test_pointer_that_is_a_symlink_is_refused(tracked, outside):
    clone = tracked["clone"]
    real = outside / "images.dvc"
    real.write_text((clone / "data" / "images.dvc").read_text())
    (clone / "data" / "images.dvc").unlink()
    os.symlink(real, clone / "data" / "images.dvc")
    with pytest.raises(DataError, match=re.escape("DVC pointer 'data/images.dvc': data/images.dvc is a symbolic link")):
        data.pull(clone, "data/images", tracked["cache"])


@pytest.mark.parametrize("cache_type", ["hardlink", "symlink"])
def test_committed_cache_link_type_is_ignored(tracked, tmp_path, cache_type):
    """A committed .dvc/config asking for links into the cache (or another site cache) is overridden."""
    clone = tracked["clone"]
    site = tmp_path / "attacker-site-cache"
    config = clone / ".dvc" / "config"
    text = config.read_text().replace("[core]\n", f"[core]\n    site_cache_dir = {site}\n")
    config.write_text(text + f"[cache]\n    type = {cache_type}\n")
    assert "site_cache_dir" in config.read_text()
    snapshot = data.pull(clone, "data/images", tracked["cache"])
    files = [p for p in (clone / "data" / "images").rglob("*") if not p.is_dir()]
    assert len(files) == snapshot.nfiles == 12
    assert all(not p.is_symlink() and p.stat().st_nlink == 1 for p in files), "work tree files are plain copies"
    assert not site.exists(), "DVC wrote into a folder the commit named"


def test_bad_files_are_all_evicted_and_a_repaired_remote_heals(tracked):
    """Every mismatching object is reported and evicted; after the remote is repaired, pull succeeds."""
    import json as _json

    entries = _json.loads(remote_object(tracked["remote"], tracked["data_hash"] + ".dir").read_text())
    originals = {}
    for entry in entries[:3]:
        obj = remote_object(tracked["remote"], entry["md5"])
        originals[obj] = obj.read_bytes()
        obj.chmod(0o644)
        obj.write_bytes(b"corrupted " + entry["md5"].encode())
    with pytest.raises(DataError) as err:
        data.pull(tracked["clone"], "data/images", tracked["cache"])
    message = str(err.value)
    assert "3 bad file(s)" in message
    for entry in entries[:3]:
        assert f"data/images/{entry['relpath']} does not match its DVC hash" in message
        assert not remote_object(tracked["cache"], entry["md5"]).exists()
    assert not (tracked["clone"] / "data" / "images").exists(), "the bad checkout is dropped"
    for obj, payload in originals.items():
        obj.write_bytes(payload)
    assert data.pull(tracked["clone"], "data/images", tracked["cache"]).nfiles == 12


def test_malformed_dvc_config_is_named(tracked):
    with open(tracked["clone"] / ".dvc" / "config", "a") as fh:
        fh.write("[core]\n    remote = other\n")
    with pytest.raises(DataError, match=r"\.dvc/config of the commit is invalid"):
        data.pull(tracked["clone"], "data/images", tracked["cache"])
