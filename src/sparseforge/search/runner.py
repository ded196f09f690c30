"""Where candidate evaluations run (this process, or Ray workers) and the memo that makes a search resumable.

Every evaluation is a :class:`Request`: an allocation and what to measure (global KL at a fidelity, or a group's
local error). :class:`Evaluations` answers a batch of requests in order: from the memo when the same request was
answered before (a duplicate candidate, or a resumed search), otherwise by the backend, and appends each new
answer to the memo file as one JSON line. The searches are deterministic for a seed and the measurements are
exact, so rerunning an interrupted search replays the memo and continues where it stopped, and a Ray run gives
the same front as a serial one.

Ray: ``workers`` actors each load the model and the variant bank once (from the cache directory the driver built,
so that directory must be visible to them) and answer contiguous slices of each batch; results are gathered in
request order. Without an address a local Ray is started; with ``--ray-address`` the address is probed first
with a bounded timeout, so an unreachable cluster is a one-line error, not a hang.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import SearchError
from ..models.handle import LoadedModel
from ..prune.methods import get_method
from .bank import VariantBank
from .quality import QualityMeter
from .space import SearchSpace


class Request(NamedTuple):
    kind: str  # "kl" or "local"
    where: str  # the fidelity (kl), or the group's first block (local)
    sparsities: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.where}|" + ",".join(f"{s:.6f}" for s in self.sparsities)


def answer(meter: QualityMeter, request: Request) -> float:
    if request.kind == "kl":
        return meter.kl(list(request.sparsities), request.where)
    return meter.local_error(int(request.where), list(request.sparsities))


@dataclass
class MeterSpec:
    """Everything a process needs to build its own bank and meter (shipped to Ray workers once)."""

    handle: LoadedModel
    space: SearchSpace
    method: str
    pattern: str
    per_row: bool
    options: dict
    calibration: torch.Tensor
    fidelities: dict[str, torch.Tensor]
    local_windows: torch.Tensor
    batch_size: int
    cache_dir: str
    budget_bytes: int

    def build(self, writable: bool, log=print, progress: bool = True) -> QualityMeter:
        bank = VariantBank(self.handle, self.space, get_method(self.method), self.pattern, self.per_row, self.options,
                           self.calibration, self.batch_size, self.cache_dir, self.budget_bytes, log, progress,
                           writable)
        return QualityMeter(bank, self.fidelities, self.local_windows, self.batch_size)


class SerialBackend:
    workers = 0

    def __init__(self, meter: QualityMeter):
        self.meter = meter

    def map(self, requests: list[Request]) -> list[float]:
        return [answer(self.meter, r) for r in requests]

    def close(self) -> None:
        pass


def probe_ray(address: str, timeout: float) -> None:
    """Fail fast when a Ray address cannot be reached (``ray.init`` itself can wait for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"Ray address must look like host:port, ray://host:port or auto, got '{address}'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise SearchError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc} within {timeout:g} s); "
                          "check the address, or leave out --ray-address to run locally") from None


def _connect(ray, address: str, timeout: float) -> None:
    """``ray.init(address)`` within ``timeout`` seconds: something that accepts TCP but is not Ray (or a cluster
    that never answers) would otherwise keep it retrying for minutes."""
    outcome: dict = {}

    def attempt() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True, name="ray-connect")
    thread.start()
    thread.join(timeout)
    if "ok" not in outcome:
        reason = outcome.get("error") or f"no answer within {timeout:g} s"
        raise SearchError(f"cannot reach the Ray cluster at {address} ({str(reason).splitlines()[0][:200]}); check "
                          "the address, or leave out --ray-address to run locally")


class RayBackend:
    def __init__(self, spec: MeterSpec, workers: int, address: str | None = None, timeout: float = 10.0):
        if workers < 1:
            raise SearchError(f"Ray needs at least 1 worker, got {workers}")
        if address:
            probe_ray(address, timeout)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        if not ray.is_initialized():
            if address:
                _connect(ray, address, timeout)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        threads = max(1, torch.get_num_threads() // workers)
        actor = ray.remote(num_cpus=1)(_Worker)
        shared = ray.put(spec)
        self.actors = [actor.remote(shared, threads) for _ in range(workers)]
        self.workers = workers

    def map(self, requests: list[Request]) -> list[float]:
        if not requests:
            return []
        size = -(-len(requests) // len(self.actors))
        futures = [a.run.remote(requests[i * size:(i + 1) * size]) for i, a in enumerate(self.actors)
                   if requests[i * size:(i + 1) * size]]
        return [value for chunk in self.ray.get(futures) for value in chunk]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class _Worker:
    """A Ray actor: one model and variant bank, answering requests."""

    def __init__(self, spec: MeterSpec, threads: int):
        torch.set_num_threads(threads)
        self.meter = spec.build(writable=False, log=lambda message: None, progress=False)

    def run(self, requests: list[Request]) -> list[float]:
        return [answer(self.meter, r) for r in requests]


@dataclass
class Evaluations:
    """Memoised, counted evaluation of requests through a backend."""

    backend: SerialBackend | RayBackend
    memo_path: Path | None = None
    memo: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # unique evaluations by "kind:where"
    tokens: int = 0  # positions scored by full-model (kl) evaluations
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.memo_path is not None and self.memo_path.is_file():
            for line in self.memo_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.memo[entry["key"]] = float(entry["value"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption: that evaluation runs again
        self._seen: set[str] = set()

    def __call__(self, requests: list[Request], fidelity_tokens: dict[str, int] | None = None) -> list[float]:
        started = time.perf_counter()
        todo = [r for r in dict.fromkeys(requests) if r.key not in self.memo]
        for request, value in zip(todo, self.backend.map(todo)):
            self.memo[request.key] = value
            if self.memo_path is not None:
                with self.memo_path.open("a") as handle:
                    handle.write(json.dumps({"key": request.key, "value": value}) + "\n")
        for request in requests:
            if request.key in self._seen:
                continue
            self._seen.add(request.key)
            label = f"{request.kind}:{request.where}" if request.kind == "kl" else "local"
            self.counts[label] = self.counts.get(label, 0) + 1
            if request.kind == "kl" and fidelity_tokens:
                self.tokens += fidelity_tokens[request.where]
        self.seconds += time.perf_counter() - started
        return [self.memo[r.key] for r in requests]

    @property
    def full_model(self) -> int:
        """Unique full-model evaluations (every fidelity counted)."""
        return sum(count for label, count in self.counts.items() if label.startswith("kl:"))

    def report(self) -> dict:
        return {"full_model_evaluations": self.full_model, "by_kind": dict(sorted(self.counts.items())),
                "full_model_tokens": self.tokens, "seconds": round(self.seconds, 1)}
