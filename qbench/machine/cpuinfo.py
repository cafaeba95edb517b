"""The CPU as /proc/cpuinfo describes it, read once per process: its model name and its feature flags."""

from __future__ import annotations

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
