"""A per-process memo of the work a run does once for all its cells (environment facts, data, tokenizers):
built once under a key that names everything it depends on; the fork server builds it before it forks."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
_MEMO: dict[Hashable, Any] = {}


def memo(key: Hashable, build: Callable[[], T]) -> T:
    """`build()`'s result, built once per process for `key` (which must name all that the result depends on)."""
    if key not in _MEMO:
        _MEMO[key] = build()
    return _MEMO[key]


def built() -> list[str]:
    """The keys built so far, as text (what the fork server reports it warmed)."""
    return [" / ".join(map(str, key)) if isinstance(key, tuple) else str(key) for key in _MEMO]
