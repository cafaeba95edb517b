"""The sampler process: every ~10 ms it reads the measured process's RSS, its process tree's PSS and NVML
memory, and keeps the peaks; at each phase boundary it also reads how much CPU the tree had and how long it
waited for one.

It runs beside the measured process, not as a thread inside it: a thread there only runs when the
measured process lets go of its GIL, so a long C call that holds the GIL (or a busy interpreter)
would hide a short spike; and a thread's readings would take the GIL from the very loop being timed.

Protocol, one JSON object per line: the sampler first writes {"hello": {...}} (which sources work);
for each "mark" line on its standard input it reads once more and writes {"peaks": {...}, "current": {...},
"samples": n, "seconds": s, "cpu": {...}} (the peaks since the previous mark, and that last reading), then
starts over; "stop" or end of input ends it. "cpu" (read at marks only, not every 10 ms) holds the tree's
CPU seconds, the seconds its threads waited for a core, the machine's busy CPU seconds and its steal share
(CpuCounters).
`SamplerProcess` is the measured process's side of this.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import psutil

from qbench.machine.cpuinfo import machine_cpu_seconds

TREE_REFRESH_S = 0.1  # how often the list of descendants is re-read
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# the share of one CPU core the sampler may spend reading smaps_rollup: the kernel walks every page of a
# process to sum its PSS, where statm's RSS is one small read (benchmarks/test_measurement_cost.py times it)
PSS_CPU_SHARE = 0.05


class SamplerFailed(RuntimeError):
    """The sampler process did not start or stopped answering."""


def _children(pid: int) -> list[int]:
    """Direct children of `pid`: Linux keeps them per thread in /proc; elsewhere ask psutil."""
    tasks = f"/proc/{pid}/task"
    try:
        children = []
        for task in os.listdir(tasks):
            with open(f"{tasks}/{task}/children", "rb") as handle:
                children += [int(c) for c in handle.read().split()]
        return children
    except (OSError, ValueError):
        pass
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


class ProcessTree:
    """A root process and its descendants (DataLoader workers and the like), without the sampler itself; with
    `server_share` (a cell forked from the fork server), its PSS as its own process (qbench.cell.measure.forked)."""

    def __init__(self, root: int, exclude: set[int] | None = None, pss_min_interval_s: float = 0.01,
                 server_share: Any = None):
        self.root = root
        self.server_share = server_share
        self.share = 0  # the fork server's share of the pages it shares with the tree, at the last full read
        self.tree_pss: int | None = None  # the tree's own PSS at the last reading, the server's share left out
        self.siblings_max = 0  # the most other cells that shared the fork server at once, since last taken
        self.exclude = exclude or set()
        self._members: list[int] = [root]
        self._refreshed = 0.0
        self._readers: dict[int, int | psutil.Process] = {}  # an open statm file, or psutil where there is none
        self.pss_min_interval_s = pss_min_interval_s
        self._pss: dict[int, tuple[int, int]] = {}  # pid -> (its PSS at the last smaps_rollup read, its RSS then)
        self._next_pss_read = 0.0
        self.pss_reads = 0  # full reads of the tree's smaps_rollup, since the counter was last taken

    def members(self) -> list[int]:
        now = time.monotonic()
        if now - self._refreshed >= TREE_REFRESH_S:
            found, frontier = [], [self.root]
            while frontier:
                pid = frontier.pop()
                if pid in self.exclude or pid in found:
                    continue
                found.append(pid)
                frontier.extend(_children(pid))
            self._members, self._refreshed = found, now
        return self._members

    def contains(self, pid: int) -> bool:
        """Whether `pid` is the root or descends from it; asked for every PID NVML lists, so a child
        that lives for 50 ms between two refreshes of the member list is still counted, and so is a known member
        that ended after NVML listed it (its parent can no longer be asked)."""
        if pid in self.exclude:
            return False
        if pid in self._members or pid in self.members():
            return True
        seen = 0
        while pid > 1 and seen < 64:
            if pid == self.root:
                return True
            try:
                pid = psutil.Process(pid).ppid()
            except psutil.Error:
                return False
            seen += 1
        return False

    def _rss_of(self, pid: int) -> int:
        """Resident bytes of one process: on Linux one read of /proc/PID/statm on a file kept open
        (the cheapest reading there is: the sampler wakes 100 times a second beside a timed loop)."""
        reader = self._readers.get(pid)
        if reader is None:
            try:
                reader = self._readers[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
            except OSError:
                reader = self._readers[pid] = psutil.Process(pid)
        if isinstance(reader, int):
            fields = os.pread(reader, 128, 0).split()
            if not fields:
                raise ProcessLookupError(pid)
            return int(fields[1]) * PAGE_BYTES
        return reader.memory_info().rss

    def rss_bytes(self) -> int | None:
        """Resident bytes of the root process alone (shared pages included, children not)."""
        try:
            return self._rss_of(self.root)
        except (OSError, ValueError, psutil.Error):
            return None

    @staticmethod
    def _pss_of(pid: int) -> int:
        """Proportional set size of one process: every resident page divided by the number of processes
        mapping it (/proc/PID/smaps_rollup, Linux 4.14+; psutil's smaps reading elsewhere it has one)."""
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
                for line in handle:
                    if line.startswith(b"Pss:"):
                        return int(line.split()[1]) * 1024
            return 0  # no mappings at all (a zombie)
        except FileNotFoundError:
            return psutil.Process(pid).memory_full_info().pss

    def pss_bytes(self) -> int | None:
        """Proportional set size of the whole tree: pages the root shares with its forked DataLoader workers
        (or with anything else) counted once in all, not once per process as a sum of RSS would.

        Reading smaps_rollup costs the kernel a walk over every page, so the tree is read in full at most
        every `pss_min_interval_s`, or less often so that the reads take at most PSS_CPU_SHARE of a core;
        at once whenever a process joins or leaves the tree (a fork or an exit moves pages between shared
        and private). Between full reads each process's PSS follows its RSS change (statm, read every
        time): pages a process allocates or frees are its own."""
        rss: dict[int, int] = {}
        for pid in self.members():
            try:
                rss[pid] = self._rss_of(pid)
            except (OSError, ValueError, psutil.Error):  # a worker that exits between listing and reading
                self._forget(pid)
        if not rss:
            return None
        now = time.monotonic()
        if now >= self._next_pss_read or set(rss) != set(self._pss):
            started = time.process_time()
            readings = {}
            for pid in rss:
                try:
                    readings[pid] = (self._pss_of(pid), rss[pid])
                except (OSError, ValueError, TypeError, psutil.Error):
                    if pid == self.root:
                        raise OSError(f"cannot read the PSS of process {pid}") from None
                    # an exiting worker (a zombie maps nothing): counted from its RSS change alone, and kept,
                    # so that it does not look like a new member at every sample and force a full read
                    readings[pid] = (0, rss[pid])
            self._pss = readings
            self.pss_reads += 1
            if self.server_share is not None:
                try:
                    self.share = self.server_share.read()
                    self.siblings_max = max(self.siblings_max, self.server_share.siblings)
                except (OSError, KeyError, ValueError):  # the server is gone: its pages are the tree's alone now
                    self.share, self.server_share = 0, None
            cost = time.process_time() - started
            self._next_pss_read = time.monotonic() + max(self.pss_min_interval_s, cost / PSS_CPU_SHARE)
        self.tree_pss = sum(max(0, pss + rss[pid] - rss_then) for pid, (pss, rss_then) in self._pss.items() if pid in rss)
        return self.tree_pss + self.share

    def taken_counts(self) -> dict[str, int]:
        """Counts since the previous call (then reset): full PSS reads of the tree, the most cells that shared the
        fork server at once, the server's share at the last read."""
        counts = {"pss_reads": self.pss_reads, "fork_server_siblings_max": self.siblings_max,
                  "fork_server_share_bytes": self.share if self.server_share is not None else None}
        self.pss_reads, self.siblings_max = 0, 0
        return counts

    def _forget(self, pid: int) -> None:
        reader = self._readers.pop(pid, None)
        if isinstance(reader, int):
            os.close(reader)


def thread_schedstat(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of `pid`: (nanoseconds on a CPU, nanoseconds runnable but waiting for one) from
    /proc/PID/task/TID/schedstat; empty where the kernel does not provide it."""
    found = {}
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                on_cpu, waiting = handle.read().split()[:2]
            found[int(tid)] = (int(on_cpu), int(waiting))
        except (OSError, ValueError):
            continue
    return found


class CpuCounters:
    """How much CPU a process tree had and how long its threads waited for one, against the whole machine's
    load, between two `take()` calls. The wait (the kernel's run-queue delay per thread) is the cell's
    contention: time it wanted a core that someone else had. Sleeping or blocking is not waiting."""

    def __init__(self, tree: ProcessTree):
        self.tree = tree
        self._threads: dict[tuple[int, int], tuple[int, int]] = {}
        self._machine = machine_cpu_seconds()
        self._started = time.perf_counter()
        self.take()

    def take(self) -> dict[str, Any] | None:
        now = time.perf_counter()
        run_ns = wait_ns = 0
        threads: dict[tuple[int, int], tuple[int, int]] = {}
        for pid in self.tree.members():
            for tid, (on_cpu, waiting) in thread_schedstat(pid).items():
                before = self._threads.get((pid, tid), (0, 0))
                run_ns += on_cpu - before[0]
                wait_ns += waiting - before[1]
                threads[(pid, tid)] = (on_cpu, waiting)
        machine, elapsed = machine_cpu_seconds(), now - self._started
        previous = self._machine
        self._threads, self._machine, self._started = threads, machine, now
        if not threads or machine is None or previous is None or elapsed <= 0:
            return None
        total = machine["total_s"] - previous["total_s"]
        return {
            "seconds": elapsed,
            "tree_run_s": run_ns / 1e9,
            "tree_wait_s": wait_ns / 1e9,
            "machine_busy_s": machine["busy_s"] - previous["busy_s"],
            "machine_steal_share": (machine["steal_s"] - previous["steal_s"]) / total if total > 0 else None,
        }


class Peaks:
    """The maximum of each reading since the last `take()`; None stays None until a reading exists."""

    def __init__(self, readers: dict[str, Any], counts: Any = None):
        self.readers = readers
        self.counts = counts  # returns counters since its previous call (e.g. ProcessTree.taken_counts), or None
        self._reset()

    def _reset(self) -> None:
        self.peaks: dict[str, int | None] = dict.fromkeys(self.readers)
        self.current: dict[str, int | None] = dict.fromkeys(self.readers)  # the latest reading of each source
        self.unknown: dict[str, int] = dict.fromkeys(self.readers, 0)
        self.samples = 0
        self.started = time.perf_counter()

    def read(self) -> None:
        for key, reader in self.readers.items():
            try:
                value = reader()
            except Exception:
                value = None
            self.current[key] = value
            if value is None:
                self.unknown[key] += 1
            elif self.peaks[key] is None or value > self.peaks[key]:
                self.peaks[key] = value
        self.samples += 1

    def take(self) -> dict[str, Any]:
        self.read()
        taken = {
            "peaks": dict(self.peaks),
            "current": dict(self.current),
            "unknown_samples": dict(self.unknown),
            "samples": self.samples,
            "seconds": time.perf_counter() - self.started,
            **(self.counts() if self.counts else {}),
        }
        self._reset()
        return taken


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(root: int, interval_s: float, nvml_ordinal: int | None, torch_uuid: str | None,
          fork_server: tuple[int, int] | None = None) -> None:
    from qbench.cell.measure import nvml
    from qbench.cell.measure.forked import ServerShare

    share = ServerShare(fork_server[0], fork_server[1], root) if fork_server else None
    tree = ProcessTree(root, exclude={os.getpid()}, pss_min_interval_s=interval_s, server_share=share)
    cpu = CpuCounters(tree)
    readers: dict[str, Any] = {"rss_bytes": tree.rss_bytes, "processes": lambda: len(tree.members())}
    hello: dict[str, Any] = {"pid": os.getpid(), "root": root}
    try:
        tree.pss_bytes()
        readers["pss_bytes"] = tree.pss_bytes
        readers["tree_pss_bytes"] = lambda: tree.tree_pss  # read right after pss_bytes, from the same reading
        hello["pss"] = {"available": True, "cpu_share": PSS_CPU_SHARE, "fork_server": tree.server_share is not None}
    except (OSError, ValueError, AttributeError, psutil.Error) as error:  # no smaps_rollup, no psutil pss (macOS)
        hello["pss"] = {"available": False, "reason": f"{type(error).__name__}: {error}"}
    device = None
    if nvml_ordinal is not None:
        try:
            device = nvml.NvmlDevice.open(nvml_ordinal, torch_uuid)
            hello["nvml"] = {"available": True, **device.info()}
            readers["nvml_process_bytes"] = lambda: device.process_used_bytes(tree.contains)
            readers["nvml_device_bytes"] = device.device_used_bytes
        except nvml.NvmlUnavailable as error:
            hello["nvml"] = {"available": False, "reason": str(error)}
    peaks = Peaks(readers, tree.taken_counts)
    peaks.read()
    _write({"hello": hello})
    stdin = sys.stdin.fileno()
    pending = b""
    next_read = time.monotonic() + interval_s
    try:
        while True:
            ready, _, _ = select.select([stdin], [], [], max(0.0, next_read - time.monotonic()))
            if ready:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command = line.decode().strip()
                    if command == "stop":
                        return
                    if command == "mark":
                        _write({**peaks.take(), "cpu": cpu.take()})
                continue
            peaks.read()
            next_read += interval_s
            if next_read < time.monotonic():  # fell behind (the machine is busy): no burst of catch-up reads
                next_read = time.monotonic() + interval_s
    finally:
        if device is not None:
            device.close()


class SamplerProcess:
    """The measured process's handle on its sampler: `mark()` returns the peaks since the previous mark."""

    def __init__(
        self,
        root: int,
        interval_s: float,
        nvml_ordinal: int | None = None,
        torch_uuid: str | None = None,
        start_timeout_s: float = 120.0,
        fork_server: tuple[int, int] | None = None,
    ):
        command = [sys.executable, "-m", "qbench.cell.measure.sampler", "--root", str(root), "--interval-s", str(interval_s)]
        if fork_server:
            command += ["--fork-server", str(fork_server[0]), "--fork-server-file-pss-bytes", str(fork_server[1])]
        if nvml_ordinal is not None:
            command += ["--nvml-ordinal", str(nvml_ordinal)]
        if torch_uuid:
            command += ["--torch-uuid", torch_uuid]
        from qbench.contract.protocol import child_env

        env = child_env()  # the sampler must run this qbench, whatever the working directory or the installed copy
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        self.pid = self._process.pid
        self.hello = self._read(start_timeout_s)["hello"]

    def _read(self, timeout_s: float) -> dict[str, Any]:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        line = self._process.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise SamplerFailed(
                f"memory sampler process {'exited' if self._process.poll() is not None else 'did not answer'}"
                f" (exit code {self._process.returncode})"
            )
        return json.loads(line)

    def mark(self, timeout_s: float = 60.0) -> dict[str, Any]:
        try:
            self._process.stdin.write("mark\n")
            self._process.stdin.flush()
        except OSError as error:
            raise SamplerFailed(f"memory sampler process is gone: {error}") from None
        return self._read(timeout_s)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write("stop\n")
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=int, required=True, help="PID whose tree is measured")
    parser.add_argument("--interval-s", type=float, default=0.01)
    parser.add_argument("--nvml-ordinal", type=int, help="torch CUDA ordinal to read through NVML")
    parser.add_argument("--torch-uuid", help="the UUID torch reports for that device")
    parser.add_argument("--fork-server", type=int, help="PID of the fork server the root was forked from")
    parser.add_argument("--fork-server-file-pss-bytes", type=int, default=0,
                        help="the server's file-backed PSS as it forked the root (qbench.cell.measure.forked)")
    args = parser.parse_args(argv)
    # in its own session (no Ctrl-C from the terminal); it ends when the measured process closes the pipe
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fork_server = (args.fork_server, args.fork_server_file_pss_bytes) if args.fork_server else None
    serve(args.root, args.interval_s, args.nvml_ordinal, args.torch_uuid, fork_server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
