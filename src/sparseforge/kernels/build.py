"""Build the native kernels on first use and load them, or say in one line why the PyTorch fallback is used.

The extension is compiled just in time (``torch.utils.cpp_extension.load``) rather than at install time so that
``pip install -e .`` needs no compiler and the binary always matches the installed torch. The build directory lives
outside git, in ``$SPARSEFORGE_CACHE/kernels/<key>`` (default ``~/.cache/sparseforge``), where the key hashes the
sources, the flags, torch's and Python's versions: a change to any of them builds afresh, anything else reuses the
cached binary. A file lock keeps two processes from building the same key at once.

No ``-march`` flag is used: every kernel names its instruction set in a target attribute, and the instruction set
is chosen at run time from what the CPU reports (:mod:`.dispatch`), so one binary runs on any x86-64 machine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import filelock
import torch

from ..assets import cache_dir

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "decode.cpp", "step_ops.cpp", "linear.cpp", "column.cpp", "recycling.cpp", "dispatch.cpp", "kernels_portable.cpp", "kernels_avx2.cpp",
           "kernels_avx512.cpp", "kernels_avx512_vbmi2.cpp")
# -fopenmp: at::parallel_for is inline and runs its OpenMP region in this library, on torch's own libgomp
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
DISABLE_ENV = "SPARSEFORGE_KERNELS"  # "torch" (or "off", "0"): never build or load, use the PyTorch fallback
BUILD_TIMEOUT_S = 900


def build_key() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2])).encode())
    return digest.hexdigest()[:16]


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("torch", "off", "0", "false")


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` package's binary is there only when the
    environment's scripts folder is (not so for ``.venv/bin/python -m ...``), so put it there."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> Any:
    from torch.utils import cpp_extension  # imported here: it is slow to import and only needed to build

    _ninja_on_path()

    key = build_key()
    name = f"sparseforge_kernels_{key}"  # also the torch.ops namespace of the operators (ops.cpp)
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(build_dir) + ".lock", timeout=BUILD_TIMEOUT_S):
        # torch's own lock file is stale whenever we hold ours (a build that was killed leaves it behind)
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS), extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
            is_python_module=False, verbose=False)
    return getattr(torch.ops, name)


@functools.lru_cache(maxsize=None)
def native() -> Any:
    """The operators of the loaded extension (``native().bitmask_matmul(...)``), or None when disabled by
    ``SPARSEFORGE_KERNELS=torch`` or when it cannot be built (then after one warning: the caller falls back to
    PyTorch, it never fails for want of a compiler)."""
    if disabled():
        return None
    try:
        return _build()
    except Exception as error:  # noqa: BLE001 - any build or load failure means: fall back
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        warnings.warn(f"sparseforge.kernels: native kernels unavailable ({reason[:200]}); using the PyTorch "
                      "fallback (weights decompressed on every call)", RuntimeWarning, stacklevel=2)
        return None
