"""Safe outputs: checked before any work, locked while written, built under a temporary name, renamed when complete.

An interrupted save (Ctrl-C, out of memory, a crash) therefore never leaves a directory that looks finished, and
the rules a user relies on hold for every command that writes:

* the location is checked before anything is computed: a parent that is a file or not writable, an existing
  output without ``--overwrite``, or (with ``--overwrite``) anything that is not a sparseforge output is refused;
* a lock file next to the output keeps a second run from writing the same output while the first is alive (the
  lock is an ``flock``, so a killed process leaves none that counts);
* ``--overwrite`` replaces only a directory that sparseforge wrote (it carries :data:`MARKER`), never a user's
  folder or file;
* temporary siblings left by a process that was killed (``.NAME.tmp-PID``) are removed by the next run, and only
  those of dead processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SparseforgeError

MARKER = ".sparseforge-output"
# exports and run directories written before the marker existed are recognised by these files
_LEGACY_MARKERS = ("sparseforge_format.json", "report.json")
_TEMP_TAGS = ("tmp", "old")


class OutputError(SparseforgeError):
    """An output location that cannot or must not be written."""


def _temp_sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_sparseforge_output(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    if (path / "sparseforge_format.json").is_file():
        return True
    report = path / "report.json"
    if report.is_file():
        try:
            return "sparseforge" in json.loads(report.read_text()).get("versions", {})
        except (ValueError, AttributeError, OSError):
            return False
    return False


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor must be a writable directory (the rest is created)."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputError(f"cannot write {path}: {ancestor} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a directory")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show up here
        os.rmdir(tempfile.mkdtemp(prefix=".sparseforge-probe-", dir=ancestor))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {ancestor} is not writable ({exc.strerror})") from None


def check_output_directory(final: str | os.PathLike, overwrite: bool = False, owned: bool = False) -> None:
    """Refuse, before any work, an output directory that cannot be written or must not be replaced (``owned``: a
    location sparseforge owns, such as its cache, where whatever is there may be replaced)."""
    final = Path(final)
    _check_parent(final)
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise OutputError(f"{final} exists and is a file, not a sparseforge output; choose another --out")
    if final.exists():
        if not overwrite:
            raise OutputError(f"output directory {final} already exists (pass --overwrite to replace it)")
        if not owned and not is_sparseforge_output(final):
            raise OutputError(f"{final} exists and was not written by sparseforge; --overwrite replaces only "
                              "sparseforge run and export directories, so move or remove it yourself")


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file path that is a directory or whose parent cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    _check_parent(path)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings whose process is dead; returns what was removed."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for tag in _TEMP_TAGS:
        for candidate in final.parent.glob(f".{final.name}.{tag}-*"):
            pid = candidate.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if candidate.is_dir() and not candidate.is_symlink():
                    shutil.rmtree(candidate, ignore_errors=True)
                else:
                    candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def output_lock(final: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to ``final`` for the duration; a live holder makes a second run fail at once (or,
    with ``wait``, as for a cache entry that two processes may build, wait for it)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(f"another sparseforge run (pid {holder}) is writing {final}; wait for it to finish "
                              "or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False, kind: str = "output",
                     owned: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block exits without error.

    The location is checked and locked first; the finished directory carries :data:`MARKER` (saying ``kind``).
    ``owned`` marks a location that belongs to sparseforge (the cache): anything there may be replaced.
    """
    final = Path(final)
    check_output_directory(final, overwrite, owned)
    with output_lock(final, wait=owned):
        check_output_directory(final, overwrite, owned)  # again under the lock: another run may have finished meanwhile
        remove_stale_temporaries(final)
        tmp = _temp_sibling(final, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if final.exists():
            old = _temp_sibling(final, "old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file complete or not at all (parents created); a directory in the way is refused."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
