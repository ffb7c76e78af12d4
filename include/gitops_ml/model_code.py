"""The model code of a commit: find it, hash it, import it from that commit's work tree only.

A model repository may define its Keras model in Python: ``model/model.py`` by default
(``model/`` may be a package with more modules), or the module named by ``params.yaml``
``model.module`` (a dotted name relative to the repository root, e.g. ``nets.small``).
The contract it implements (``build_model``, optional ``augment``) is checked by
``gitops_ml.training``, the only module that imports TensorFlow; this module holds what
needs no TensorFlow: where the code is, which files it is made of, their hash, and the
guards around running it.

Guards while user code runs (``guarded``):

- **One commit's code at a time.** The module is imported with the commit's work tree first
  on ``sys.path``; every module imported from that tree (and any earlier commit's copy of
  the same top-level package) is dropped from ``sys.modules`` before and after, so two
  commits handled by one process (a worker, or ``dag.test()``) never share a stale module.
  A top-level name that is already an installed module (``json``, ``keras``, ...) is refused
  instead of shadowing it.
- **No downloads.** Outgoing TCP/UDP connections from the thread that runs the user code are
  refused with a message telling the user to track the file with DVC (``training`` also
  refuses Keras ``get_file``, which would read an unpinned cache first).
- **A time limit** (``train.timeout_minutes``): the code is interrupted with
  ``ModelCodeTimeout``; an outer alarm (Airflow's ``execution_timeout``) still fires on time.

Every error is a ``ModelCodeError`` (an ``InputError``: the Airflow task fails without
retries) naming the file and line of the user's code, or the ``params.yaml`` key.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gitops_ml.errors import DataError, DownloadRefused, ModelCodeError, ModelCodeTimeout

DEFAULT_MODULE = "model.model"
DEFAULT_TIMEOUT_MINUTES = 360
MAX_FILES = 500
MAX_BYTES = 16 * 1024 * 1024
TRACK_WITH_DVC = (
    "downloads at training time are not reproducible: track the file (e.g. pretrained weights) "
    "with DVC in a folder of the repository (`dvc add weights`), name that folder in params.yaml "
    "model.weights and load it from there"
)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,9}", re.ASCII)


@dataclass(frozen=True)
class ModelCode:
    """The model code of one checked-out commit.

    ``module`` is the dotted name imported, ``root`` the work tree, ``files`` the
    repository-relative paths of every Python file of its top-level package (or the single
    module file), ``code_hash`` their hash (what the inputs hash and the registry record).
    """

    module: str
    root: str
    files: tuple[str, ...]
    code_hash: str

    @property
    def top_level(self) -> str:
        return self.module.split(".")[0]

    @property
    def origin(self) -> str:
        """The repository-relative file that defines ``module``."""
        return _module_file(Path(self.root), self.module)[1]


def _module_file(root: Path, module: str) -> tuple[Path | None, str]:
    parts = module.split(".")
    as_file = "/".join(parts) + ".py"
    as_package = "/".join(parts) + "/__init__.py"
    for rel in (as_file, as_package):
        if (root / rel).is_file() or (root / rel).is_symlink():
            return root / rel, rel
    return None, as_file


def _jail(root: Path, relpath: str, what: str) -> Path:
    from gitops_ml.data import inside  # noqa: PLC0415 - the work-tree jail of the data pull

    try:
        return inside(root, relpath, what)
    except DataError as exc:
        raise ModelCodeError(str(exc)) from None


def locate(workdir: str | Path, model_params: dict[str, Any] | None) -> ModelCode | None:
    """The model code of the commit checked out at ``workdir``, or ``None`` (the built-in CNN).

    ``model_params`` is the ``model:`` section of ``params.yaml``; its ``module`` key names the
    module, else ``model/model.py`` is used when the commit has it.
    """
    root = Path(workdir).resolve()
    configured = (model_params or {}).get("module")
    module = configured if configured is not None else DEFAULT_MODULE
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
        raise ModelCodeError(
            f"params.yaml: model.module must be a dotted Python module name relative to the "
            f"repository root (e.g. model.model), got {module!r}"
        )
    path, rel = _module_file(root, module)
    if path is None:
        if configured is None:
            return None
        raise ModelCodeError(
            f"params.yaml: model.module {module!r}: neither {rel} nor "
            f"{rel.removesuffix('.py')}/__init__.py exists in the commit"
        )
    _jail(root, rel, "model.module file")
    top = module.split(".")[0]
    if (root / top).is_dir():
        package_dir = _jail(root, top, "model code folder")
        files = []
        for dirpath, dirnames, filenames in os.walk(package_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel_file = full.relative_to(root).as_posix()
                if full.is_symlink():
                    raise ModelCodeError(
                        f"{rel_file} is a symbolic link: commit the model code itself "
                        "(links could lead outside the work tree)"
                    )
                if name.endswith(".py"):
                    files.append(rel_file)
    else:
        files = [rel]
    if len(files) > MAX_FILES:
        raise ModelCodeError(f"model code {top}/ has {len(files)} Python files, over the limit of {MAX_FILES}")
    digest = hashlib.sha256()
    total = 0
    for rel_file in sorted(files):
        content = (root / rel_file).read_bytes()
        total += len(content)
        digest.update(rel_file.encode() + b"\0" + hashlib.sha256(content).digest())
    if total > MAX_BYTES:
        raise ModelCodeError(f"model code {top}/ is {total} bytes, over the limit of {MAX_BYTES}")
    return ModelCode(module=module, root=str(root), files=tuple(sorted(files)), code_hash=digest.hexdigest()[:16])


def _from_tree(module: Any, root: str) -> bool:
    origin = getattr(module, "__file__", None) or ""
    paths = list(getattr(module, "__path__", []) or [])
    return any(str(p).startswith(root + os.sep) for p in [origin, *paths] if p)


# Roots of work trees whose code this process imported: their modules are dropped on every entry.
_IMPORTED_ROOTS: set[str] = set()


def _forget(top_level: str) -> None:
    """Drop ``top_level`` and every module imported from a work tree from ``sys.modules``."""
    for name, module in list(sys.modules.items()):
        if (
            name == top_level
            or name.startswith(top_level + ".")
            or any(_from_tree(module, root) for root in _IMPORTED_ROOTS)
        ):
            del sys.modules[name]
    importlib.invalidate_caches()


def _refuse_shadowing(code: ModelCode) -> None:
    """A top-level name that already means an installed module would shadow it (or be shadowed)."""
    top = code.top_level
    loaded = sys.modules.get(top)
    if loaded is not None:
        installed = not any(_from_tree(loaded, root) for root in _IMPORTED_ROOTS)
    else:
        spec = importlib.util.find_spec(top)
        installed = spec is not None and spec.origin is not None and not spec.origin.startswith(code.root + os.sep)
    if installed or top in sys.stdlib_module_names or top == "gitops_ml":
        raise ModelCodeError(
            f"model code package {top!r} ({code.origin}) has the name of an installed module: "
            "rename it (and model.module in params.yaml)"
        )


def where(exc: BaseException, root: str) -> str:
    """``model/model.py, line 12, in build_model``: the deepest frame of ``exc`` inside the work tree."""
    if isinstance(exc, SyntaxError) and exc.filename and str(exc.filename).startswith(root):
        return f"{os.path.relpath(exc.filename, root)}, line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root + os.sep)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{os.path.relpath(frame.filename, root)}, line {frame.lineno}, in {frame.name}"


def describe(exc: BaseException, code: ModelCode, doing: str) -> ModelCodeError:
    """A ``ModelCodeError`` for ``exc`` raised by the user's code while ``doing`` (e.g. ``calling build_model``)."""
    place = where(exc, code.root) or code.origin
    if isinstance(exc, DownloadRefused):
        return ModelCodeError(f"{place}: {exc}")
    if isinstance(exc, ModelCodeError):
        return exc
    if isinstance(exc, SyntaxError):
        return ModelCodeError(f"{place}: syntax error: {exc.msg}")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        missing = exc.name.split(".")[0]
        if not (Path(code.root) / missing).exists() and not (Path(code.root) / f"{missing}.py").exists():
            return ModelCodeError(
                f"{place}: imports package {missing!r}, which is not installed on the workers; "
                "model code can use the packages of gitops-ml's environment (TensorFlow, Keras, "
                "NumPy, ...) and modules committed in the repository"
            )
    return ModelCodeError(f"{place}: {type(exc).__name__} while {doing}: {exc}")


_NO_NETWORK = threading.local()


def _guarded_connect(original):
    def connect(self, address, *args):
        if getattr(_NO_NETWORK, "active", False) and self.family in (socket.AF_INET, socket.AF_INET6):
            raise DownloadRefused(f"model code may not open network connections (tried {address!r}): {TRACK_WITH_DVC}")
        return original(self, address, *args)

    return connect


_INSTALL_LOCK = threading.Lock()


def _install_connect_guard() -> None:
    with _INSTALL_LOCK:
        if getattr(socket.socket.connect, "_gitops_ml_guard", False):
            return
        for name in ("connect", "connect_ex"):
            guarded = _guarded_connect(getattr(socket.socket, name))
            guarded._gitops_ml_guard = True
            setattr(socket.socket, name, guarded)


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuse TCP/UDP connections from this thread (other threads, e.g. log shipping, are not affected)."""
    _install_connect_guard()
    before = getattr(_NO_NETWORK, "active", False)
    _NO_NETWORK.active = True
    try:
        yield
    finally:
        _NO_NETWORK.active = before


@contextlib.contextmanager
def time_limit(minutes: float, what: str) -> Iterator[None]:
    """Interrupt the block with ``ModelCodeTimeout`` after ``minutes`` (main thread only, else no limit).

    An alarm set by the caller (Airflow's ``execution_timeout``) is kept: if it is due first its
    handler runs at its time, and it is re-armed for the time it has left when the block ends.
    The alarm repeats every second, so user code that swallows the exception is stopped anyway.
    """
    if threading.current_thread() is not threading.main_thread() or minutes <= 0:
        yield
        return
    seconds = minutes * 60
    start = time.monotonic()
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_deadline = start + outer_left if outer_left > 0 else None

    def on_alarm(signum, frame):
        if outer_deadline is not None and time.monotonic() >= outer_deadline and callable(previous):
            previous(signum, frame)
        raise ModelCodeTimeout(
            f"{what} did not finish within train.timeout_minutes = {minutes:g} "
            f"(params.yaml): stopped after {time.monotonic() - start:.0f} s"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    first = min(seconds, outer_left) if outer_left > 0 else seconds
    signal.setitimer(signal.ITIMER_REAL, first, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, outer_deadline - time.monotonic()))


@contextlib.contextmanager
def imported(code: ModelCode) -> Iterator[Any]:
    """Import ``code.module`` from its work tree; yield the module; forget it afterwards.

    While the block runs the work tree is first on ``sys.path`` (lazy imports inside
    ``build_model`` work) and the current directory, so relative file paths in the code
    (``params["weights"]``) are relative to the repository root; no ``__pycache__`` is written
    into the work tree.
    """
    _refuse_shadowing(code)
    _IMPORTED_ROOTS.add(code.root)
    _forget(code.top_level)
    cwd = os.getcwd()
    bytecode = sys.dont_write_bytecode
    sys.path.insert(0, code.root)
    sys.dont_write_bytecode = True
    os.chdir(code.root)
    try:
        try:
            module = importlib.import_module(code.module)
        except ModelCodeTimeout:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, SystemExit included
            raise describe(exc, code, f"importing {code.module}") from None
        yield module
    finally:
        os.chdir(cwd)
        sys.dont_write_bytecode = bytecode
        with contextlib.suppress(ValueError):
            sys.path.remove(code.root)
        _forget(code.top_level)
