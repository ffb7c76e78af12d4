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
import re
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import yaml

from gitops_ml.errors import DataError
from gitops_ml.images import FORMATS as IMAGE_FORMATS
from gitops_ml.refs import redact

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


_DIR_MD5_RE = re.compile(r"[0-9a-f]{32}\.dir")
_MD5_RE = re.compile(r"[0-9a-f]{32}")
# Keys of a ``dvc add`` pointer.  ``deps``/``cmd``/``wdir`` (imports and stages) would make DVC
# fetch from another source or write relative to another folder: refused.
_POINTER_KEYS = {"outs", "meta", "md5", "frozen", "desc"}
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


def inside(repo_root: Path, relpath: str, what: str) -> Path:
    """``repo_root / relpath``, refusing anything that could lead out of the work tree.

    No absolute path, no ``..``, and no existing component may be a symbolic link (a
    committed symlink could point anywhere the worker can write); the resolved path must
    stay under the resolved ``repo_root``.  ``what`` names the input in the error.
    """
    root = Path(repo_root).resolve()
    rel = PurePosixPath(relpath)
    if not relpath or "\x00" in relpath or "\\" in relpath or rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{what} {relpath!r} must be a relative path inside the repository without '..'")
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise DataError(
                f"{what} {relpath!r}: {path.relative_to(root).as_posix()} is a symbolic link "
                "(links could lead outside the work tree; commit the real folder)"
            )
    if not path.resolve().is_relative_to(root):
        raise DataError(f"{what} {relpath!r} resolves outside the work tree")
    return path


def read_pointer(repo_root: Path, data_path: str) -> tuple[str, dict]:
    """Return (pointer file name, its single ``outs`` entry) for the tracked ``data_path``.

    The pointer must be a plain ``dvc add`` file of exactly ``data_path``: one output whose
    ``path`` is the folder's own name, a directory hash, no stage or import keys.
    """
    pointer = f"{data_path}.dvc"
    pointer_file = inside(repo_root, pointer, "DVC pointer")
    if not pointer_file.is_file():
        raise DataError(f"DVC pointer {pointer} not found in the commit: track {data_path} with `dvc add {data_path}`")
    try:
        content = yaml.safe_load(pointer_file.read_text(encoding="utf-8"))
        outs = content["outs"]
        out = outs[0]
        md5 = out["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"DVC pointer {pointer} is malformed: {exc!r}") from None
    extra = sorted(set(content) - _POINTER_KEYS)
    if extra:
        raise DataError(
            f"DVC pointer {pointer} has unsupported key(s) {', '.join(map(str, extra))}: "
            "only a `dvc add` pointer (outs) is allowed, no imports or stages"
        )
    if len(outs) != 1 or not isinstance(out, dict):
        raise DataError(f"DVC pointer {pointer} must have exactly one output, got {len(outs)}")
    expected_path = PurePosixPath(data_path).name
    if out.get("path") != expected_path:
        raise DataError(
            f"DVC pointer {pointer}: outs[0].path must be {expected_path!r} (the folder next to the "
            f"pointer), got {out.get('path')!r}"
        )
    if not isinstance(md5, str) or not md5.endswith(".dir"):
        raise DataError(f"DVC pointer {pointer} must track a directory (md5 ending in .dir), got {md5!r}")
    if not _DIR_MD5_RE.fullmatch(md5):
        raise DataError(f"DVC pointer {pointer}: md5 must be 32 lowercase hex digits + '.dir', got {md5!r}")
    return pointer, out


def check_manifest(raw: bytes, data_path: str, dir_md5: str) -> dict[str, str]:
    """Validate a DVC directory manifest before anything is written from it; return ``{relpath: md5}``.

    Every entry must be a relative POSIX path without ``..``/``.``/empty components or
    backslashes, with a 32-hex md5; no two entries may collide (also not when the file
    system folds case) and no entry may be the folder of another.
    """
    if hashlib.md5(raw).hexdigest() != dir_md5.removesuffix(".dir"):
        raise DataError(f"directory manifest of {data_path} does not match its DVC hash {dir_md5}")
    try:
        entries = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"directory manifest {dir_md5} of {data_path} is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise DataError(f"directory manifest {dir_md5} of {data_path} must be a list of entries")
    expected: dict[str, str] = {}
    folded: dict[str, str] = {}
    for i, entry in enumerate(entries):
        relpath = entry.get("relpath") if isinstance(entry, dict) else None
        md5 = entry.get("md5") if isinstance(entry, dict) else None
        where = f"directory manifest {dir_md5} of {data_path}, entry {i}"
        if not isinstance(relpath, str) or not isinstance(md5, str) or not _MD5_RE.fullmatch(md5):
            raise DataError(f"{where}: needs a 'relpath' string and a 32-hex 'md5', got {entry!r:.200}")
        parts = relpath.split("/")
        if (
            not relpath
            or relpath.startswith("/")
            or "\\" in relpath
            or "\x00" in relpath
            or any(p in ("", ".", "..") for p in parts)
            or ":" in parts[0]
        ):
            raise DataError(
                f"{where}: path {relpath!r} would be written outside {data_path} "
                "(absolute, '..', '.', empty component or backslash)"
            )
        key = relpath.casefold()
        if key in folded:
            raise DataError(
                f"{where}: {data_path}/{relpath} collides with {data_path}/{folded[key]} "
                "(same name, or same name on a case-insensitive file system)"
            )
        folded[key] = relpath
        expected[relpath] = md5
    for relpath in expected:
        parent = relpath.rsplit("/", 1)[0].casefold() if "/" in relpath else None
        while parent:
            if parent in folded:
                raise DataError(
                    f"directory manifest {dir_md5} of {data_path}: {data_path}/{folded[parent]} is "
                    f"both a file and the folder of {data_path}/{relpath}"
                )
            parent = parent.rsplit("/", 1)[0] if "/" in parent else None
    return expected


def _open_repo(repo_root: Path, cache_dir: Path):
    from dvc.config import ConfigError  # noqa: PLC0415 - keep `import gitops_ml.data` light
    from dvc.repo import Repo  # noqa: PLC0415

    # The commit's .dvc/config is untrusted: every setting that names a local folder, or how the
    # work tree is linked to the cache, is ours.  Plain copies: no symlink or hard link into the cache.
    cache_dir = Path(cache_dir)
    try:
        return Repo(
            str(repo_root),
            config={
                "cache": {"dir": str(cache_dir), "type": "copy"},
                "core": {
                    "site_cache_dir": str(cache_dir.with_name(cache_dir.name + "-site")),
                    "analytics": False,
                    "check_update": False,
                },
            },
        )
    except ConfigError as exc:
        raise DataError(f".dvc/config of the commit is invalid: {redact(str(exc))}") from None


def _cache_object(cache_dir: Path, md5: str) -> Path:
    return Path(cache_dir) / "files" / "md5" / md5[:2] / md5[2:]


def _stage_manifest(repo, data_path: str, dir_md5: str, cache_dir: Path) -> dict[str, str]:
    """Get the directory manifest (cache, else the default remote), validate it, keep it in the cache.

    DVC finds the validated manifest in the cache and never fetches another copy, so what it
    writes is exactly what was checked here.
    """
    cached = _cache_object(cache_dir, dir_md5)
    raw = cached.read_bytes() if cached.is_file() else None
    from_cache = raw is not None and hashlib.md5(raw).hexdigest() == dir_md5.removesuffix(".dir")
    if not from_cache:
        try:
            odb = repo.cloud.get_remote_odb(None, hash_name="md5")
            remote_path = odb.oid_to_path(dir_md5)
            if odb.fs.size(remote_path) > MAX_MANIFEST_BYTES:
                raise DataError(f"directory manifest {dir_md5} of {data_path} is over {MAX_MANIFEST_BYTES} bytes")
            raw = odb.fs.cat_file(remote_path)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(
                f"dvc pull of {data_path}.dvc ({dir_md5}) failed: the directory manifest is missing "
                f"from the remote; missing from remote: {data_path} (directory manifest {dir_md5})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any remote type; the message names the manifest
            raise DataError(
                f"could not read directory manifest {dir_md5} of {data_path} from the DVC remote: {redact(str(exc))}"
            ) from None
    assert raw is not None  # read from the cache or the remote above
    expected = check_manifest(raw, data_path, dir_md5)
    if not from_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if cached.exists():
            os.chmod(cached, 0o644)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, cached)
    return expected


def _refuse_links(data_root: Path, data_path: str) -> None:
    """The data folder holds only what DVC copies there: a symlink or hard link in it is refused."""
    if not data_root.exists():
        return
    if not data_root.is_dir():
        raise DataError(f"{data_path} exists in the commit but is not a folder")
    for dirpath, dirnames, filenames in os.walk(data_root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
                kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "hard link"
                raise DataError(
                    f"{data_path}/{path.relative_to(data_root).as_posix()} is a {kind}: the data "
                    "folder may only hold files DVC checks out (links could write outside the work tree)"
                )


def pull(repo_root: Path | str, data_path: str, cache_dir: Path) -> DataSnapshot:
    """``dvc pull`` the directory ``data_path`` of the checked-out commit and verify every file.

    Before DVC writes anything: the pointer, the data folder (no link anywhere on its way or
    inside it) and every entry of the directory manifest are checked, so nothing lands
    outside the work tree.  Raises ``DataError`` naming the pointer, the missing object or
    the offending file.
    """
    from dvc.exceptions import DvcException  # noqa: PLC0415

    repo_root = Path(repo_root)
    pointer, out = read_pointer(repo_root, data_path)
    dir_md5 = out["md5"]
    data_root = inside(repo_root, data_path, "data.path")
    _refuse_links(data_root, data_path)
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
        _stage_manifest(repo, data_path, dir_md5, cache_dir)
        try:
            repo.pull(targets=[str(repo_root / pointer)])
        except DvcException as exc:
            missing = _missing_in_remote(repo, data_path, dir_md5)
            detail = f"; missing from remote {default_remote!r}: {', '.join(missing[:5])}" if missing else ""
            raise DataError(f"dvc pull of {pointer} ({dir_md5}) failed: {redact(str(exc))}{detail}") from None
    finally:
        repo.close()
    _refuse_links(data_root, data_path)
    try:
        nfiles = verify(repo_root, data_path, dir_md5, cache_dir)
    except DataError:
        # The next attempt must start from the remote, not from these files: drop the checked-out
        # data (DVC-managed, not in Git; `git reset --hard` would leave it as it is).
        shutil.rmtree(data_root, ignore_errors=True)
        raise
    log.info("pulled %s: %d files match DVC hash %s", data_path, nfiles, dir_md5)
    return DataSnapshot(
        path=str(repo_root / data_path), data_hash=dir_md5.removesuffix(".dir"), nfiles=nfiles, pointer=pointer
    )


def check_remote(repo_root: Path, cache_dir: Path) -> str:
    """Reach the default DVC remote of the work tree ``repo_root`` (``gitops-ml doctor``); say what was found.

    Raises ``DataError`` naming the remote when none is configured, it cannot be reached (credentials,
    host) or it holds nothing at its path (a missing bucket, or data never pushed).
    """
    repo = _open_repo(repo_root, cache_dir)
    try:
        remotes = dict(repo.config.get("remote", {}))
        default_remote = repo.config.get("core", {}).get("remote")
        if not default_remote or default_remote not in remotes:
            raise DataError("no default DVC remote in .dvc/config (`dvc remote add -d NAME URL`, then commit)")
        where = f"DVC remote {default_remote!r} ({redact(str(remotes[default_remote].get('url', '')))})"
        try:
            odb = repo.cloud.get_remote_odb(None, hash_name="md5")
            found = odb.fs.exists(odb.path)
        except Exception as exc:  # noqa: BLE001 - any remote type; the message names the remote
            raise DataError(f"{where} is not reachable: {redact(str(exc))}") from None
        if not found:
            raise DataError(
                f"{where} holds nothing at {odb.path}: the bucket or folder is missing, "
                "or nothing was pushed (`dvc push`)"
            )
        return f"{where}: reachable, holds data"
    finally:
        repo.close()


def _missing_in_remote(repo, data_path: str, dir_md5: str) -> list[str]:
    """Which objects of ``dir_md5`` the default remote lacks (any DVC remote type)."""
    try:
        odb = repo.cloud.get_remote_odb(None, hash_name="md5")
        manifest = odb.oid_to_path(dir_md5)
        if not odb.fs.exists(manifest):
            return [f"{data_path} (directory manifest {dir_md5})"]
        entries = json.loads(odb.fs.cat_file(manifest))
        return [
            f"{data_path}/{e['relpath']} ({e['md5']})" for e in entries if not odb.fs.exists(odb.oid_to_path(e["md5"]))
        ]
    except Exception as exc:  # noqa: BLE001 - only used to enrich an error message
        log.warning("could not list missing objects of %s: %s", data_path, exc)
        return []


def verify(repo_root: Path, data_path: str, dir_md5: str, cache_dir: Path) -> int:
    """Re-hash the pulled files against the manifest of ``dir_md5``; return the file count."""
    manifest = _cache_object(cache_dir, dir_md5)
    if not manifest.is_file():
        raise DataError(f"directory manifest {dir_md5} of {data_path} is not in the DVC cache")
    try:
        expected = check_manifest(manifest.read_bytes(), data_path, dir_md5)
    except DataError:
        os.chmod(manifest, 0o644)
        manifest.unlink()
        raise
    root = inside(repo_root, data_path, "data.path")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    extra = sorted(on_disk - set(expected))
    if extra:
        raise DataError(f"{data_path}/{extra[0]} is not part of DVC hash {dir_md5} ({len(extra)} unexpected file(s))")
    missing = [relpath for relpath in sorted(expected) if not (root / relpath).is_file()]
    if missing:
        raise DataError(
            f"{data_path}/{missing[0]} is missing after dvc pull (expected md5 {expected[missing[0]]}; "
            f"{len(missing)} file(s) missing)"
        )
    bad = [
        (relpath, md5, actual) for relpath, md5 in sorted(expected.items()) if (actual := _md5(root / relpath)) != md5
    ]
    if bad:
        for _, md5, _ in bad:  # never let a later run trust a corrupted object: evict every one
            cached = _cache_object(cache_dir, md5)
            if cached.is_file() and _md5(cached) != md5:
                os.chmod(cached, 0o644)
                cached.unlink()
        listed = "; ".join(
            f"{data_path}/{r} does not match its DVC hash: expected md5 {m}, got {a}" for r, m, a in bad[:20]
        )
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(
            f"{listed}{more} ({len(bad)} bad file(s); their objects were evicted from the cache, "
            "the next pull fetches them again from the remote)"
        )
    return len(expected)


def scan_images(root: Path | str, data_path: str = "data/images") -> ImageIndex:
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
                with Image.open(image, formats=IMAGE_FORMATS) as img:
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
