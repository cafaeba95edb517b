"""The CPU as /proc/cpuinfo describes it, read once per process (its model name and its feature flags), and how
busy the whole machine has been (/proc/stat)."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

CPUINFO = "/proc/cpuinfo"


@cache
def fields(cpuinfo: str = CPUINFO) -> dict[str, str] | None:
    """The first processor's `key: value` lines (x86 `flags`, Arm `Features`, `model name`); None where the file
    cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if found:
                break  # the blank line after the first processor
            continue
        found.setdefault(key.strip(), value.strip())
    return found


def flags(cpuinfo: str = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); None where /proc/cpuinfo cannot be read."""
    read = fields(cpuinfo)
    if read is None:
        return None
    return frozenset((read.get("flags") or read.get("Features") or "").split())


def model(cpuinfo: str = CPUINFO) -> str:
    """The CPU's model name, else what `platform` knows."""
    return (fields(cpuinfo) or {}).get("model name") or platform.processor() or platform.machine()


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_cpu_seconds(stat: str = "/proc/stat") -> dict[str, float] | None:
    """Cumulative CPU seconds of the whole machine since boot (all cores): busy, steal and total; None off Linux."""
    try:
        with open(stat, "rb") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return {
        "busy_s": (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_S,
        "steal_s": steal / CLOCK_TICKS_PER_S,
        "total_s": sum(fields) / CLOCK_TICKS_PER_S,
    }
