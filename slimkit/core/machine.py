"""What this machine's CPU can do: its model name, instruction-set flags and a one-line ISA name.

Integer kernels differ by ISA (AVX2, AVX-512 VNNI, AVX512_BF16, AMX), so every speed
figure slimkit prints names the ISA it was measured on, and kernel choices are cached per
ISA. Read from ``/proc/cpuinfo`` (Linux); elsewhere the flags are empty and the ISA is the
platform's machine name.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Flags that name an ISA level, from the richest down: the first present names the machine.
_ISA_LEVELS = (
    ("amx_int8", "AMX"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512f", "AVX-512"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx2", "AVX2"),
)


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _field(name: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                 if line.lower().startswith(name)), "")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return frozenset(_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC' (the platform's processor string where /proc is absent)."""
    return _field("model name") or platform.processor() or "unknown"


def cpu_isa(flags: frozenset[str] | None = None) -> str:
    """A short ISA name for speed tables, e.g. 'AVX-512 VNNI + BF16' or 'AVX2'.

    ``flags``: the flags to describe (this CPU's by default; tests pass fakes).
    """
    flags = cpu_flags() if flags is None else flags
    level = next((name for flag, name in _ISA_LEVELS if flag in flags), platform.machine() or "unknown")
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        level += " + BF16"
    return level


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 dot products in hardware (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags
