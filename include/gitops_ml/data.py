"""DVC: pull the data of a checked-out commit, verify it against its DVC hashes, index it.

``dvc pull`` trusts whatever the remote returns; a corrupted object in the remote
lands in the work tree without a word.  ``pull`` therefore re-hashes every file
against the directory manifest that the commit's ``.dvc`` pointer names, and
evicts a bad object from the shared cache so no later run trusts it.

The image folder follows ``tf.keras.utils.image_dataset_from_directory``:
``<data.path>/<class>/<image>``, PNG / JPEG / GIF / BMP, grey or colour, any size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gitops_ml.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp"}


@dataclass(frozen=True)
class DataSnapshot:
    """The data of one commit after ``pull``: where it is and the DVC hash it matched."""

    path: str
    data_hash: str
    nfiles: int
    pointer: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageIndex:
    """Every image of a folder with its label index; ``class_names[i]`` names label ``i``."""

    class_names: list[str]
    files: list[str]
    labels: list[int]
    root: str = ""


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_pointer(repo_root: Path, data_path: str) -> tuple[str, dict]:
    """Return (pointer file name, its single ``outs`` entry) for the tracked ``data_path``."""
    pointer = f"{data_path}.dvc"
    pointer_file = Path(repo_root) / pointer
    if not pointer_file.is_file():
        raise DataError(f"DVC pointer {pointer} not found in the commit: track {data_path} with `dvc add {data_path}`")
    try:
        content = yaml.safe_load(pointer_file.read_text(encoding="utf-8"))
        out = content["outs"][0]
        md5 = out["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"DVC pointer {pointer} is malformed: {exc!r}") from None
    if not isinstance(md5, str) or not md5.endswith(".dir"):
        raise DataError(f"DVC pointer {pointer} must track a directory (md5 ending in .dir), got {md5!r}")
    return pointer, out


def _open_repo(repo_root: Path, cache_dir: Path):
    from dvc.repo import Repo  # noqa: PLC0415 - keep `import gitops_ml.data` light

    return Repo(str(repo_root), config={"cache": {"dir": str(cache_dir)}})


def _cache_object(cache_dir: Path, md5: str) -> Path:
    return Path(cache_dir) / "files" / "md5" / md5[:2] / md5[2:]


def pull(repo_root: Path, data_path: str, cache_dir: Path) -> DataSnapshot:
    """``dvc pull`` the directory ``data_path`` of the checked-out commit and verify every file.

    Raises ``DataError`` naming the pointer, the missing object or the mismatching file.
    """
    from dvc.exceptions import DvcException  # noqa: PLC0415

    repo_root = Path(repo_root)
    pointer, out = read_pointer(repo_root, data_path)
    dir_md5 = out["md5"]
    repo = _open_repo(repo_root, cache_dir)
    try:
        remotes = dict(repo.config.get("remote", {}))
        default_remote = repo.config.get("core", {}).get("remote")
        if not remotes or not default_remote:
            raise DataError(
                f"no default DVC remote configured for {pointer} in .dvc/config "
                "(add one with `dvc remote add -d NAME URL` and commit it)"
            )
        if default_remote not in remotes:
            raise DataError(f"DVC default remote {default_remote!r} is not defined in .dvc/config")
        try:
            repo.pull(targets=[str(repo_root / pointer)])
        except DvcException as exc:
            missing = _missing_in_remote(repo, data_path, dir_md5)
            detail = f"; missing from remote {default_remote!r}: {', '.join(missing[:5])}" if missing else ""
            raise DataError(f"dvc pull of {pointer} ({dir_md5}) failed: {exc}{detail}") from None
    finally:
        repo.close()
    nfiles = verify(repo_root, data_path, dir_md5, cache_dir)
    log.info("pulled %s: %d files match DVC hash %s", data_path, nfiles, dir_md5)
    return DataSnapshot(path=str(repo_root / data_path), data_hash=dir_md5.removesuffix(".dir"),
                        nfiles=nfiles, pointer=pointer)


def _missing_in_remote(repo, data_path: str, dir_md5: str) -> list[str]:
    """Which objects of ``dir_md5`` the default remote lacks (any DVC remote type)."""
    try:
        odb = repo.cloud.get_remote_odb(None, hash_name="md5")
        manifest = odb.oid_to_path(dir_md5)
        if not odb.fs.exists(manifest):
            return [f"{data_path} (directory manifest {dir_md5})"]
        entries = json.loads(odb.fs.cat_file(manifest))
        return [f"{data_path}/{e['relpath']} ({e['md5']})" for e in entries
                if not odb.fs.exists(odb.oid_to_path(e["md5"]))]
    except Exception as exc:  # noqa: BLE001 - only used to enrich an error message
        log.warning("could not list missing objects of %s: %s", data_path, exc)
        return []


def verify(repo_root: Path, data_path: str, dir_md5: str, cache_dir: Path) -> int:
    """Re-hash the pulled files against the manifest of ``dir_md5``; return the file count."""
    manifest = _cache_object(cache_dir, dir_md5)
    if not manifest.is_file():
        raise DataError(f"directory manifest {dir_md5} of {data_path} is not in the DVC cache")
    if _md5(manifest) != dir_md5.removesuffix(".dir"):
        manifest.unlink()
        raise DataError(f"directory manifest of {data_path} does not match its DVC hash {dir_md5}")
    entries = json.loads(manifest.read_bytes())
    root = Path(repo_root) / data_path
    expected = {e["relpath"]: e["md5"] for e in entries}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    extra = sorted(on_disk - set(expected))
    if extra:
        raise DataError(f"{data_path}/{extra[0]} is not part of DVC hash {dir_md5} ({len(extra)} unexpected file(s))")
    for relpath, md5 in sorted(expected.items()):
        path = root / relpath
        if not path.is_file():
            raise DataError(f"{data_path}/{relpath} is missing after dvc pull (expected md5 {md5})")
        actual = _md5(path)
        if actual != md5:
            bad = _cache_object(cache_dir, md5)
            if bad.is_file() and _md5(bad) != md5:
                os.chmod(bad, 0o644)
                bad.unlink()  # never let a later run trust a corrupted object
            raise DataError(
                f"{data_path}/{relpath} does not match its DVC hash: expected md5 {md5}, got {actual}"
            )
    return len(expected)


def scan_images(root: Path, data_path: str = "data/images") -> ImageIndex:
    """Index ``root/<class>/<image>``; every class needs an image, every file must decode.

    Names the offending folder or file (relative to the repository, as ``data_path/...``).
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{data_path} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DataError(f"{data_path}/{stray[0]} is a file outside any class folder ({data_path}/<class>/<image>)")
    if len(class_dirs) < 2:
        raise DataError(f"{data_path} needs at least 2 class folders, found {len(class_dirs)}")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not images:
            raise DataError(f"class folder {data_path}/{class_dir.name} has no images")
        for image in images:
            rel = f"{data_path}/{image.relative_to(root).as_posix()}"
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{rel} is not an image (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
            try:
                with Image.open(image) as img:
                    img.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise DataError(f"{rel} is not a readable image: {exc}") from None
            files.append(str(image))
            labels.append(label)
    return ImageIndex(class_names=[p.name for p in class_dirs], files=files, labels=labels, root=str(root))


def track_and_push(repo_root: Path, data_path: str, remote_name: str, remote_url: str) -> str:
    """``dvc init`` (if needed), set the default remote, ``dvc add`` and ``dvc push``; return the data hash."""
    from dvc.repo import Repo  # noqa: PLC0415

    repo_root = Path(repo_root)
    repo = Repo(str(repo_root)) if (repo_root / ".dvc").is_dir() else Repo.init(str(repo_root))
    try:
        with repo.config.edit() as conf:
            conf["remote"][remote_name] = {"url": remote_url}
            conf["core"]["remote"] = remote_name
        repo.add(str(repo_root / data_path))
        repo.push(targets=[str(repo_root / f"{data_path}.dvc")])
    finally:
        repo.close()
    _, out = read_pointer(repo_root, data_path)
    return out["md5"].removesuffix(".dir")
