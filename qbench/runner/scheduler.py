"""Where cells run: a matrix shard per machine, and the next cell to the next free device slot."""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

CellT = TypeVar("CellT")

# a GPU as CUDA_VISIBLE_DEVICES names it: an index, or a GPU-/MIG- UUID
_GPU_NAME = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/-]+)$")


@dataclass(frozen=True)
class Slot:
    """Room for one cell process at a time; `env` is what that process gets on top of the parent's."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


LOCAL_SLOT = Slot("local")


def parse_gpus(text: str) -> list[str]:
    """`--gpus 0,1,2,3` -> ['0', '1', '2', '3']; ValueError naming what is wrong.

    A GPU may be listed twice to run two cells side by side on it (small cells on a large card)."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise ValueError(f"--gpus: expected a comma-separated list of GPU indices such as 0,1,2,3 (got {text!r})")
    bad = [name for name in names if not _GPU_NAME.match(name)]
    if bad:
        raise ValueError(f"--gpus: {', '.join(map(repr, bad))} is not a GPU index or GPU-/MIG- UUID")
    return names


def gpu_slots(gpus: Sequence[str], per_cell: int = 1) -> list[Slot]:
    """One slot per `per_cell` consecutive GPUs of the list; each slot's cells see only its GPUs."""
    if per_cell < 1:
        raise ValueError(f"--gpus-per-cell must be at least 1 (got {per_cell})")
    if len(gpus) % per_cell:
        raise ValueError(f"--gpus lists {len(gpus)} GPUs, which is not a multiple of --gpus-per-cell {per_cell}")
    groups = [list(gpus[start : start + per_cell]) for start in range(0, len(gpus), per_cell)]
    for group in groups:
        if len(set(group)) != len(group):
            raise ValueError(f"--gpus: one cell cannot use GPU {group[0]} twice ({','.join(group)})")
    return [Slot(f"gpu {'+'.join(group)}", {"CUDA_VISIBLE_DEVICES": ",".join(group)}) for group in groups]


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard 2/4` -> (2, 4): the second of four shards, counted from 1."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard: expected I/N such as 1/2 (got {text!r})")
    index, count = int(match[1]), int(match[2])
    if not 1 <= index <= count:
        raise ValueError(f"--shard: I must be between 1 and N (got {text!r})")
    return index, count


def shard_cells(cells: Sequence[CellT], index: int, count: int) -> list[CellT]:
    """Shard `index` of `count` (from 1): every count-th cell of the matrix, starting at the index-th.

    Deterministic for the same suite and the same --only/--seeds, so the shards of all machines
    together are exactly the cells of one full run, each once; dealing round-robin spreads every
    precision's cells over the shards."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index}/{count} does not exist")
    return list(cells[index - 1 :: count])


class _Serialized:
    """Calls a listener from one thread at a time, so listeners need not be thread-safe."""

    def __init__(self, listener: Any):
        self._listener = listener
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._listener, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return call


def serialized(listener: Any) -> Any:
    """`listener` with its calls made one at a time (cells report from one thread per slot)."""
    return listener if isinstance(listener, _Serialized) else _Serialized(listener)


def schedule(
    cells: Sequence[CellT],
    slots: Sequence[Slot],
    supervise: Callable[[CellT, Slot], dict[str, Any] | None],
    on_start: Callable[[CellT, int, Slot], None] = lambda cell, index, slot: None,
    on_finish: Callable[[CellT, dict[str, Any]], None] = lambda cell, record: None,
    stop_running: Callable[[], None] = lambda: None,
    poll_s: float = 0.2,
) -> list[dict[str, Any]]:
    """Run every cell, at most one per slot at a time, handing the next cell to the next free slot.

    A thread pool with one thread per slot (`concurrent.futures`): cells start in matrix order; a
    slot is free again as soon as its cell returns, whatever its status. Returns the records in cell
    order (not finishing order). `on_start` and `on_finish` are called from one thread at a time. If
    `supervise` raises, no further cell starts, the running ones finish, and the first error (in cell
    order) is raised. On KeyboardInterrupt no further cell starts, `stop_running` is called, the
    running cells are waited for, and the interrupt goes on.
    """
    if not slots:
        raise ValueError("no slot to run cells on")
    free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    lock = threading.Lock()
    stopping = threading.Event()  # set by a runner error or an interrupt: start no further cell

    def work(index: int, cell: CellT) -> dict[str, Any] | None:
        with lock:
            if stopping.is_set():
                return None
            slot = free.get_nowait()  # never empty: the pool runs at most one cell per slot
            on_start(cell, index, slot)
        try:
            record = supervise(cell, slot)
        except BaseException:
            stopping.set()
            raise
        finally:
            free.put(slot)
        with lock:
            on_finish(cell, record)
        return record

    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="qbench-cell")
    futures = [pool.submit(work, index, cell) for index, cell in enumerate(cells)]
    try:
        _wait(futures, poll_s)
    except KeyboardInterrupt:
        stopping.set()
        for future in futures:
            future.cancel()  # those not started yet
        stop_running()
        _wait(futures, poll_s)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if errors:
        raise errors[0]
    return [record for record in (f.result() for f in futures) if record is not None]


def _wait(futures: list[Future], poll_s: float) -> None:
    """Until every future is done; a timeout keeps Ctrl-C responsive in the calling thread."""
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=poll_s)
