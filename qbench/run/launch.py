"""Launching one cell's child process: the one place that starts `python -m qbench.cell`, feeds it its
spec and reads its progress, used by every executor (the local runner and each Ray task).

    with open(log_path, "a") as log:
        cell = CellProcess(spec, env, log)
        for event in cell.events():   # QBENCH_EVENT lines; any other output goes to `log`
            ...
        returncode = cell.wait()

The child writes its record to `spec.record_path` itself; what to do with it (keep it, or build a failure
record from its last checkpoint) is the caller's business.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qbench.run.protocol import CellSpec, parse_event

CELL_COMMAND = (sys.executable, "-m", "qbench.cell")  # reads the cell's spec on stdin, writes its record
CHILD_STOP_GRACE_S = 60  # what a cell gets to write its interrupted record after SIGTERM


class CellProcess:
    """One cell's child process, started with its spec on standard input.

    Standard error and every standard-output line that is not a progress event go to `log`;
    `events()` yields the progress events (`protocol.parse_event`) as they come and ends when the
    child closes its output. `last_phase` is the last phase the child announced."""

    def __init__(
        self, spec: CellSpec, env: Mapping[str, str], log: TextIO,
        command: Sequence[str] = CELL_COMMAND, cwd: str | Path | None = None,
    ):
        self.log = log
        self.last_phase: str | None = None
        self.child = subprocess.Popen(
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(env), cwd=cwd,
        )
        try:
            self.child.stdin.write(spec.to_json())
            self.child.stdin.close()
        except BrokenPipeError:  # the cell died before reading its spec; its exit code says how
            pass

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def returncode(self) -> int | None:
        return self.child.returncode

    def events(self) -> Iterator[dict[str, Any]]:
        """The child's progress events, in order; other output lines are written to the log."""
        for line in self.child.stdout:
            event = parse_event(line)
            if event is None:
                self.log.write(line)
                continue
            self.last_phase = event.get("phase", self.last_phase)
            yield event

    def wait(self, timeout: float | None = None) -> int:
        return self.child.wait(timeout)

    def poll(self) -> int | None:
        return self.child.poll()

    def terminate(self) -> None:
        """Ask the cell to stop: it records itself as interrupted and exits."""
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = CHILD_STOP_GRACE_S) -> None:
        """Ask the cell to stop, then make sure it is gone: killed after `grace_s`, or at once when a
        second Ctrl-C or SIGTERM arrives while waiting."""
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.child.kill()
                self.child.wait()
