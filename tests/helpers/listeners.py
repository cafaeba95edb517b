"""A run listener for the tests: it keeps what it hears, in order."""

from __future__ import annotations

from typing import Any


class RecordingListener:
    """Each cell's start, events and end as ("started" | "event" | "finished", cell id, detail)."""

    def __init__(self):
        self.log: list[tuple[str, str, dict[str, Any]]] = []

    def cell_started(self, cell, index, total):
        self.log.append(("started", cell.id, {}))

    def cell_event(self, cell, event):
        self.log.append(("event", cell.id, event))

    def cell_finished(self, cell, record):
        self.log.append(("finished", cell.id, record))

    def started(self) -> set[str]:
        """The cells whose start was heard (on Ray: once their task's placement reached the driver)."""
        return {cell_id for kind, cell_id, _ in list(self.log) if kind == "started"}
