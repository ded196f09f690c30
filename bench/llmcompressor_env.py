"""A separate virtual environment with llm-compressor, and a runner for `llmcompressor_worker.py` inside it.

llm-compressor pins its own transformers/compressed-tensors versions, so it lives in its own venv instead of the
project's `.venv`; the benchmark talks to it through a subprocess and one JSON line. Standard library only.

    from llmcompressor_env import ensure_venv, run_worker
    python = ensure_venv(Path("~/.cache/sparseforge/llmcompressor-venv").expanduser())
    result = run_worker(python, ["--model", DIR, "--calibration", C, "--evaluation", E, "--method", "wanda"])
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# torch must be pinned exactly: this machine's pip finds the CPU build of 2.13.0 locally, while an unpinned torch
# would pull a multi-GB CUDA build.
REQUIREMENTS = ["torch==2.13.0", "llmcompressor>=0.14,<0.15"]
STAMP_NAME = ".sparseforge-llmcompressor-stamp"
WORKER = Path(__file__).resolve().with_name("llmcompressor_worker.py")


def _venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(path: Path) -> Path:
    """Create the venv at `path` with llm-compressor (once; a stamp file records the requirements).

    Returns the venv's python. Re-runs the install when the stamp is missing or names other requirements (an
    interrupted install leaves no stamp, so the next call repairs it).
    """
    path = Path(path).expanduser().resolve()
    python = _venv_python(path)
    stamp = path / STAMP_NAME
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        if path.exists() and any(path.iterdir()):
            raise RuntimeError(f"{path} exists and is not a virtual environment; remove it or choose another path")
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(path)], check=True)
    stamp.unlink(missing_ok=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(wanted)
    tmp.replace(stamp)
    return python


def run_worker(python: Path, args: list[str], *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `llmcompressor_worker.py` with `python` and return the JSON object it prints last on stdout.

    Raises RuntimeError with the tail of stderr when the worker fails or prints no JSON.
    """
    cmd = [str(python), str(WORKER), *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (IndexError, ValueError) as exc:
        raise RuntimeError(f"llm-compressor worker printed no JSON result ({exc}): {' '.join(cmd)}\n"
                           f"stdout: {proc.stdout[-2000:]!r}\n{tail}") from None
    return result
