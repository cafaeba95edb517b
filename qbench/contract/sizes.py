"""Memory sizes as people write them ("12GB", "12 GiB", "800MiB") -> bytes, and bytes -> a short label.

Accepted: a number (whole or with a decimal point) and one unit, with or without a space between them; the
unit's letters in any case. Decimal units count powers of 1000 (B, kB, MB, GB, TB), binary units powers of
1024 (KiB, MiB, GiB, TiB). A bare number, a bare `K`/`M`/`G` (decimal or binary?) and bits (`Gb` reads as
bytes, since no memory budget is given in bits) are the only doubtful cases: the first two are refused with
what to write instead.
"""

from __future__ import annotations

import re

UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
ACCEPTED = "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class SizeError(ValueError):
    """Text that is not a memory size; the message says what was expected."""


def parse_size(text: str | int) -> int:
    """Bytes in `text` (a whole number of bytes passes through); SizeError naming the accepted units otherwise.
    Fractions of a byte are dropped ("1.5kB" is 1500 bytes, "0.5B" is refused as 0)."""
    if isinstance(text, bool):
        raise SizeError(f"{text!r} is not a size; write e.g. 12GiB or 800MiB ({ACCEPTED})")
    if isinstance(text, int):
        if text <= 0:
            raise SizeError(f"{text} bytes: a size must be positive")
        return text
    if not isinstance(text, str):
        raise SizeError(f"{text!r} is not a size; write e.g. 12GiB or 800MiB ({ACCEPTED})")
    found = _SIZE.match(text)
    if not found:
        raise SizeError(f"{text!r} is not a size; write a number and a unit, e.g. 12GiB or 800MiB ({ACCEPTED})")
    number, unit = found.groups()
    if not unit:
        raise SizeError(f"{text!r} has no unit; write e.g. {number}MiB or {number}GB ({ACCEPTED})")
    factor = UNITS.get(unit.lower())
    if factor is None:
        if unit.lower() in ("k", "m", "g", "t"):
            raise SizeError(f"{text!r}: {unit!r} could mean {unit.upper()}B (powers of 1000) or {unit.upper()}iB "
                            f"(powers of 1024); write one of them")
        raise SizeError(f"{text!r}: unknown unit {unit!r}; accepted: {ACCEPTED}")
    size = int(float(number) * factor) if "." in number else int(number) * factor
    if size <= 0:
        raise SizeError(f"{text!r}: a size must be at least one byte")
    return size


def label(size: int | float | None) -> str:
    """`12.0 MiB`: bytes in the largest binary unit that keeps the number at least 1 (what reports show)."""
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.2f} {unit}"
        value /= 1024
    return f"{value:,.2f} TiB"
