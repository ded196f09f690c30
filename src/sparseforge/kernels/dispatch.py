"""Which code path a matmul takes: a native instruction set, or the PyTorch fallback.

``isa="auto"`` takes the best instruction set that is both compiled in and supported by this CPU, in the order
:func:`preference` gives for its vendor; the ``SPARSEFORGE_KERNEL_ISA`` environment variable replaces "auto" (to
pin a path for a whole run). A forced instruction set this CPU lacks falls back to the best one it has, after a one-line warning,
so a setting made on one machine never crashes another; ``"torch"`` always takes the PyTorch path.
"""

from __future__ import annotations

import functools
import os
import warnings

from .build import native
from .layouts import KernelInputError

# The instruction sets, best first where the CPU's vendor does not change the order. The VBMI2 bitmask kernel
# (one 16-bit-lane expand per 32 inputs) measured 2x slower per chunk than two 32-bit-lane expands on AMD Zen 4
# (docs/kernels.md), but faster on Intel Xeon (Sapphire Rapids class: 4096 x 4096 at 70%, fp16 836 against 932 us,
# bf16 735 against 898 us, where its expand also lets bf16 values skip the conversion); "auto" orders them by vendor.
NATIVE_ISAS = ("avx512", "avx512_vbmi2", "avx2", "portable")
ISA_CHOICES = ("auto", *NATIVE_ISAS, "torch")
ISA_ENV = "SPARSEFORGE_KERNEL_ISA"


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; "" where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def preference(vendor: str) -> tuple[str, ...]:
    """The order "auto" tries the instruction sets in on a CPU of ``vendor``."""
    if vendor == "GenuineIntel":
        return ("avx512_vbmi2", "avx512", "avx2", "portable")
    return NATIVE_ISAS


@functools.lru_cache(maxsize=None)
def _usable() -> tuple[str, ...]:
    ops = native()
    if ops is None:
        return ()
    cpu, compiled = set(ops.cpu_isas()), set(ops.compiled_isas())
    return tuple(isa for isa in preference(cpu_vendor()) if isa in cpu and isa in compiled)


def isa_info() -> dict:
    """What this machine offers: the instruction sets the CPU supports and the library compiled (both empty when
    the native library is unavailable), and the path ``isa="auto"`` takes."""
    ops = native()
    return {"native": ops is not None, "cpu": list(ops.cpu_isas()) if ops else [],
            "compiled": list(ops.compiled_isas()) if ops else [], "usable": list(_usable()),
            "auto": resolve_isa("auto") or "torch"}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_isa(isa: str = "auto") -> str | None:
    """The native instruction set to run, or None for the PyTorch path."""
    if isa == "auto":
        isa = os.environ.get(ISA_ENV, "").strip() or "auto"
    if isa not in ISA_CHOICES:
        raise KernelInputError(f"unknown isa '{isa}'; use one of {', '.join(ISA_CHOICES)}")
    if isa == "torch":
        return None
    usable = _usable()
    if not usable:
        return None
    if isa != "auto" and isa not in usable:
        _warn_once(f"sparseforge.kernels: {isa} is not available on this CPU (usable: {', '.join(usable)}); "
                   f"using {usable[0]}")
        return usable[0]
    return usable[0] if isa == "auto" else isa
