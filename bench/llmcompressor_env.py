"""Separate virtual environments for other tools (llm-compressor, an old compressed-tensors, llama.cpp), and a
runner for a worker script inside one.

Those tools pin their own transformers/compressed-tensors versions or build native code, so each lives in its own
venv instead of the project's `.venv`; the benchmarks talk to them through a subprocess and one JSON line.
Standard library only.

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
# compressed-tensors 0.14.0.1 is the last release with the sparse compressors (it needs transformers < 5)
LEGACY_COMPRESSED_TENSORS = ["torch==2.13.0", "compressed-tensors==0.14.0.1", "transformers>=4.45,<5", "psutil"]
# llama.cpp's Python binding builds llama.cpp from source (a few minutes on 2 cores), for this CPU
LLAMA_CPP = ["llama-cpp-python==0.3.36", "numpy"]
LLAMA_CPP_BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
                                     "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"}
STAMP_NAME = ".sparseforge-llmcompressor-stamp"
WORKER = Path(__file__).resolve().with_name("llmcompressor_worker.py")


def _venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(path: Path, requirements: list[str] = REQUIREMENTS, build_env: dict | None = None) -> Path:
    """Create the venv at `path` with `requirements` (once; a stamp file records them).

    Returns the venv's python. Re-runs the install when the stamp is missing or names other requirements (an
    interrupted install leaves no stamp, so the next call repairs it).
    """
    path = Path(path).expanduser().resolve()
    python = _venv_python(path)
    stamp = path / STAMP_NAME
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        if path.exists() and any(path.iterdir()):
            raise RuntimeError(f"{path} exists and is not a virtual environment; remove it or choose another path")
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(path)], check=True)
    stamp.unlink(missing_ok=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True,
                   env={**os.environ, **(build_env or {})})
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(wanted)
    tmp.replace(stamp)
    return python


def run_worker(python: Path, args: list[str], *, timeout: float | None = None, env: dict | None = None,
               worker: Path = WORKER) -> dict:
    """Run `worker` (default `llmcompressor_worker.py`) with `python`; return the JSON object it prints last.

    Raises RuntimeError with the tail of stderr when the worker fails or prints no JSON.
    """
    cmd = [str(python), str(worker), *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (IndexError, ValueError) as exc:
        raise RuntimeError(f"worker printed no JSON result ({exc}): {' '.join(cmd)}\n"
                           f"stdout: {proc.stdout[-2000:]!r}\n{tail}") from None
    return result
