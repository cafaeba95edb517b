"""A forked cell's memory as its own process: the fork server's share of the pages it shares with the cell.

A cell forked from the run's fork server (qbench.runner.forkserver) starts with the server's pages — the
imported runtime, the run's data — shared with it, and PSS charges each shared page in equal parts to the
processes mapping it: the server keeps half of ~190 MiB that a cell started as its own process holds whole.
A record's PSS is the fine-tune's, whatever started the cell, so the sampler adds back what the server holds
of those pages (`ServerShare.read`):

- anonymous pages (the server's heap: Python objects, torch's allocations, the data) can be shared only with
  the server's descendants, so the server's share of those it shares with the cell's tree is its anonymous
  PSS less its private dirty pages (those only it maps). Exact while the cell is the only one forked from the
  server (one cell at a time), DataLoader workers of the cell included;
- file-backed pages (shared libraries) may also be mapped by any other process on the machine, so for them
  the PSS the server lost since the fork is added: its file PSS as it forked the cell (`at_fork`, handed to
  the cell in its environment) less its file PSS now. Exact for a cell without DataLoader workers.

With several cells forked from the server at once, each cell's figure leaves out a share of the pages the
siblings also map; the record counts the siblings (`memory.fork_server_siblings_max`).
"""

from __future__ import annotations

import os

ENV_PID = "QBENCH_FORK_SERVER_PID"
ENV_FILE_PSS = "QBENCH_FORK_SERVER_FILE_PSS_BYTES"


def rollup(pid: int | str) -> dict[str, int]:
    """/proc/PID/smaps_rollup as bytes per field (Pss, Pss_Anon, Pss_File, Private_Dirty, ...); OSError off Linux."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
        for line in handle:
            name, _, rest = line.partition(b":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == b"kB":
                fields[name.decode()] = int(parts[0]) * 1024
    return fields


def at_fork() -> dict[str, str]:
    """In the fork server, just before it forks a cell: the environment the cell's measurement reads (the server's
    id and its file-backed PSS now); empty where /proc cannot say."""
    try:
        file_pss = rollup("self")["Pss_File"]
    except (OSError, KeyError, ValueError):
        return {}
    return {ENV_PID: str(os.getpid()), ENV_FILE_PSS: str(file_pss)}


def fork_server() -> tuple[int, int] | None:
    """(server pid, its file-backed PSS as it forked this process) when this process is a cell the fork server
    forked and still its child; None for a cell started any other way."""
    try:
        pid, file_pss = int(os.environ[ENV_PID]), int(os.environ[ENV_FILE_PSS])
    except (KeyError, ValueError):
        return None
    return (pid, file_pss) if os.getppid() == pid else None


class ServerShare:
    """Reads the fork server's share of the pages it shares with a cell's process tree (see the module docstring)."""

    def __init__(self, server: int, file_pss_at_fork: int, cell: int):
        self.server, self.file_pss_at_fork, self.cell = server, file_pss_at_fork, cell
        self.siblings = 0  # other children of the server at the last read

    def read(self) -> int:
        """Bytes to add to the tree's PSS; OSError when the server cannot be read (it is gone)."""
        from qbench.cell.measure.sampler import _children

        self.siblings = sum(1 for pid in _children(self.server) if pid != self.cell)
        server = rollup(self.server)
        anonymous = max(0, server.get("Pss_Anon", 0) - server.get("Private_Dirty", 0))
        files = max(0, self.file_pss_at_fork - server.get("Pss_File", 0))
        return anonymous + files
