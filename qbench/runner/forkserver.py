"""The fork server: one process per run that imports torch, transformers, peft and bitsandbytes once,
builds the run's data once, and forks each cell (and each probe) from that state.

A cell still runs in a fresh process of its own (its memory, its allocator, its threads); what it no
longer pays is the imports and the run-wide work every cell used to repeat (the run's header says how long
the server took). The server
never computes with torch and never touches CUDA (a process that initialized CUDA cannot fork children
that use it; bitsandbytes queries the GPU when imported, so on a machine where torch sees a GPU the
server does not preload and the runner launches plain subprocesses instead). Torch runs here with one
thread, so no OpenMP thread pool exists that a forked child could inherit half of.

Protocol over a Unix SOCK_SEQPACKET socket (one JSON message per packet, file descriptors attached; a message
larger than INLINE_LIMIT, e.g. the text of a large suite or a large environment, travels in an anonymous file
whose descriptor its packet carries, since a packet cannot be larger than the socket's send buffer):

    server -> parent   {"hello": {...}}                        once the imports are done
    parent -> server   {"op": "warm", "suite_text", "suite_path"}  -> {"warmed": {...}} or {"error": ...}
    parent -> server   {"op": "fork", "target": "module:function", "env": {...}} + fds [stdin, stdout, stderr]
                       -> {"forked": PID}
    server -> parent   {"exited": PID, "returncode": N}        when a child ends (-N: killed by signal N)

When the parent goes away (the socket closes) the server stops its children (SIGTERM: each records itself
as interrupted; SIGKILL after a grace) and exits: a cell of a killed run cannot go on writing into a run
directory that a resume now owns.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

MAX_MESSAGE = 1 << 20
# a packet this small always fits the socket's send buffer (net.core.wmem_default is about 208 KiB on Linux,
# and may be set lower); a longer message goes in a file whose descriptor the packet carries
INLINE_LIMIT = 32 * 1024
CARRIED = "carried_bytes"  # the one key of a packet whose message is in the attached file
# imported before any cell forks; the cell's own heavy imports then cost nothing
PRELOAD = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "psutil",
    "qbench.cell.pipeline", "qbench.cell.models", "qbench.cell.lora", "qbench.cell.readback", "qbench.cell.train",
    "qbench.cell.measure.memory", "qbench.cell.measure.timing", "qbench.cell.measure.weights", "qbench.cell.measure.weight_error",
    "qbench.machine.environment", "qbench.machine.compute", "qbench.cell.compute_probe", "qbench.cell.tasks.clip", "qbench.cell.tasks.causal_lm",
)
PR_SET_PDEATHSIG = 1
CHILD_GRACE_S = 10.0  # what a cell gets to write its interrupted record when the runner is gone


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent ends (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """One message (and `fds`) as one packet; a long one in an attached anonymous file (see INLINE_LIMIT)."""
    data = json.dumps(message).encode()
    fds = list(fds or [])
    if len(data) <= INLINE_LIMIT:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)
        return
    carrier = _carrier(data)
    try:
        socket.send_fds(sock, [json.dumps({CARRIED: len(data)}).encode()], [*fds, carrier])
    finally:
        os.close(carrier)


def _carrier(data: bytes) -> int:
    """A descriptor of an anonymous file holding `data`, read from its start."""
    try:
        fd = os.memfd_create("qbench-message", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux: an unlinked temporary file does the same
        import tempfile

        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """(message, fds), or (None, []) when the other side closed the socket."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds + 1)  # + 1: the file of a long message
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = json.loads(data)
    if isinstance(message, dict) and set(message) == {CARRIED} and fds:
        with os.fdopen(fds.pop(), "rb") as carried:
            message = json.loads(carried.read())
    return message, fds
def _cuda_visible_to_torch() -> bool:
    """Whether torch sees a GPU, asked in a forked child so that this process never initializes CUDA."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer and leave without running any cleanup of the parent's
        os.close(read)
        answer = b"0"
        try:
            import torch

            answer = b"1" if torch.cuda.is_available() else b"0"
        finally:
            os.write(write, answer)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer == b"1"


def preload() -> dict[str, Any]:
    """Import what every cell imports; say what was imported, or why the server stays bare."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    import torch

    torch.set_num_threads(1)  # never an OpenMP pool here: a forked child would inherit it half-made
    if _cuda_visible_to_torch():
        return {"preloaded": False, "cuda_available": True,
                "reason": "torch sees a GPU; bitsandbytes initializes CUDA when imported, and a process that "
                          "initialized CUDA cannot fork children that use it"}
    failed = {}
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as error:  # the cell imports it again and fails there, with its record
            failed[name] = f"{type(error).__name__}: {error}"
    return {"preloaded": True, "cuda_available": False, "modules": len(PRELOAD) - len(failed), "failed": failed,
            "import_s": time.perf_counter() - started, "import_cpu_s": time.process_time() - cpu_started}


def warm(message: dict[str, Any]) -> dict[str, Any]:
    """The run-wide work of a suite's cells, done once here: see qbench.cell.shared.warm."""
    from qbench.cell import shared

    started, cpu_started = time.perf_counter(), time.process_time()
    done = shared.warm(message["suite_text"], message["suite_path"], message.get("device", "cpu"))
    gc.collect()
    gc.freeze()  # what is here now stays put: children do not copy its pages by counting references to it
    return {**done, "seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started}


def _memory_at_fork() -> dict[str, str]:
    """What the measurement of a forked cell needs from its server (qbench.cell.measure.forked): the server's id
    and the PSS of its file-backed pages as it forks, before the cell shares any of them."""
    from qbench.cell.measure.forked import at_fork

    return at_fork()


def _child(target: str, env: dict[str, str], fds: list[int], sock: socket.socket, wakeup: int,
           fork_env: dict[str, str] | None = None) -> None:
    """In the forked child: become a fresh process with the given standard streams and environment, run
    `target` ("module:function", returning an exit code) and exit without running the server's cleanup."""
    code = 1
    try:
        sock.close()
        os.close(wakeup)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        die_with_parent()
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        os.environ.clear()
        os.environ.update(env)  # the frozen objects stay frozen: a collection here would copy their pages
        os.environ.update(fork_env or {})
        module, _, function = target.partition(":")
        sys.argv = [module]
        code = getattr(importlib.import_module(module), function)()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code if isinstance(code, int) else 1)


def serve(sock: socket.socket) -> None:
    from qbench.cell import parent

    parent.share_with_children()
    children: set[int] = set()
    closed_by_runner = False  # the runner said "close": else an end of the socket means the runner is gone
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears about it

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})

    try:
        while True:
            ready, _, _ = select.select([sock, wakeup_read], [], [])
            if wakeup_read in ready:
                os.read(wakeup_read, 512)
                reap()
            if sock not in ready:
                continue
            message, fds = receive(sock, max_fds=3)
            if message is None:
                return
            op = message.get("op")
            if op == "close":
                closed_by_runner = True
                return
            if op == "warm":
                try:
                    send(sock, {"warmed": warm(message)})
                except Exception as error:
                    send(sock, {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)})
            elif op == "fork":
                sys.stdout.flush()
                sys.stderr.flush()
                fork_env = _memory_at_fork()  # the cell's PSS as its own process: see qbench.cell.measure.forked
                pid = os.fork()
                if pid == 0:
                    _child(message["target"], message["env"], fds, sock, wakeup_read, fork_env)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                send(sock, {"forked": pid})
            else:
                for fd in fds:
                    os.close(fd)
                send(sock, {"error": f"unknown op {op!r}"})
    finally:  # the parent is gone or stopped us: no cell of this run may outlive it
        if children and not closed_by_runner:
            parent.mark_runner_gone()  # the cells' SIGTERM is the runner's death passed on
        stop_children(children)


def stop_children(children: set[int], grace_s: float = CHILD_GRACE_S) -> None:
    """SIGTERM each child (a cell records itself as interrupted, as on its parent-death signal), then SIGKILL
    whatever still runs after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                children.discard(pid)
        deadline = time.monotonic() + grace_s
        while children and sig == signal.SIGTERM and time.monotonic() < deadline:
            for pid in list(children):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        children.discard(pid)
                except ChildProcessError:
                    children.discard(pid)
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the Unix socket shared with the runner")
    args = parser.parse_args(argv)
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C and a closed terminal are the runner's and the cells' to handle
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    try:
        hello = preload()
    except Exception as error:
        hello = {"preloaded": False, "reason": f"{type(error).__name__}: {error}"}
    send(sock, {"hello": hello})
    if not hello.get("preloaded"):
        return 0
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
