"""Launching one cell's child process: the one place that starts a cell, feeds it its spec and reads its
progress, used by every executor (this machine's, each Ray task, each SLURM job).

    with open(log_path, "a") as log:
        cell = CellProcess(spec, env, log)            # `python -m qbench.cell`, a fresh interpreter
        cell = CellProcess(spec, env, log, server=fs)  # or forked from the run's fork server (qbench.runner.forkserver)
        for event in cell.events():   # QBENCH_EVENT lines; any other output goes to `log`
            ...
        returncode = cell.wait()

The child writes its record to `spec.record_path` itself; what to do with it (keep it, or build a failure
record from its last checkpoint) is the caller's business. A forked cell is a fresh process too: the
server (one per run, on a CPU) has imported torch, transformers, peft and bitsandbytes and built the run's
data once, and forks each cell from that state, so a cell no longer pays for its imports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from qbench.contract.files import write_text_atomic
from qbench.contract.protocol import CellSpec, child_env, parse_event
from qbench.runner import forkserver as wire

CHILD_STOP_GRACE_S = 60  # what a cell gets to write its interrupted record after SIGTERM


@dataclass(frozen=True)
class Target:
    """What a child process runs: `python -m module` as a subprocess, `function` ("module:function",
    returning an exit code) when forked."""

    module: str
    function: str

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module]


CELL = Target("qbench.cell", "qbench.cell.pipeline:main")  # spec on stdin, events on stdout, record on disk
COMPUTE_PROBE = Target("qbench.cell.compute_probe", "qbench.cell.compute_probe:main")  # request on stdin, answer on stdout


class CellProcess:
    """One cell's child process, started with its spec on standard input.

    Standard error and every standard-output line that is not a progress event go to `log`;
    `events()` yields the progress events (`protocol.parse_event`) as they come and ends when the
    child closes its output. `last_phase` is the last phase the child announced. The process runs `target`
    (qbench's cell unless an executor says otherwise): `python -m` it, or, with `server`, forked from that
    fork server; `launcher` says which. `fields`, `failure`, `wall_s`: what an executor adds to the record (none here)."""

    def __init__(
        self, spec: CellSpec, env: Mapping[str, str], log: TextIO, target: Target = CELL,
        cwd: str | Path | None = None, server: ForkServerLauncher | None = None,
    ):
        self.log = log
        self.last_phase: str | None = None
        self.fields: dict[str, Any] = {}
        self.failure: dict[str, Any] | None = None
        self.wall_s: float | None = None  # measured by whoever waits for it
        self.launcher = "forkserver" if server is not None else "subprocess"
        if server is not None:
            self.child: Any = server.start(target, dict(env), log)
        else:
            self.child = subprocess.Popen(
                target.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(env), cwd=cwd,
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
        try:
            for line in self.child.stdout:
                event = parse_event(line)
                if event is None:
                    self.log.write(line)
                    continue
                self.last_phase = event.get("phase", self.last_phase)
                yield event
        finally:
            self.child.stdout.close()

    def wait(self, timeout: float | None = None) -> int:
        return self.child.wait(timeout)

    def poll(self) -> int | None:
        return self.child.poll()

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Ask the cell to stop (SIGTERM, or the signal that stopped the run): it records itself as interrupted,
        naming the signal, and exits."""
        if self.child.poll() is None:
            self.child.send_signal(sig)

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


class ForkServerUnavailable(RuntimeError):
    """The fork server did not start, or will not fork here (torch sees a GPU); use subprocesses."""


class ForkedProcess:
    """A child forked by the fork server: not this process's child, so its exit status comes from the server."""

    def __init__(self, pid: int, stdin: IO[str], stdout: IO[str], server: ForkServerLauncher):
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None
        self._server = server

    def poll(self) -> int | None:
        self.returncode = self._server._returncode(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server._wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"forked cell {self.pid}", timeout or 0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServerLauncher:
    """One fork server per run: started with the run's environment, warmed with its suite, closed at the end."""

    name = "forkserver"

    def __init__(self, env: dict[str, str] | None = None):
        """Start the server; it imports while the caller does other work. `ready()` waits for it."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = parent
        self._log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115  (kept: see save_log)
        self.started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "qbench.runner.forkserver", "--fd", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=child_env(env),
            )
        finally:
            child.close()
        self._lock = threading.Lock()  # one launch at a time: replies come in request order
        self._exits: dict[int, int] = {}
        self._exited = threading.Condition()
        self._replies: list[dict[str, Any]] = []
        self._closed = False
        self.hello: dict[str, Any] | None = None
        self.ready_s: float | None = None
        self.warmed: dict[str, Any] = {}

    def ready(self, timeout_s: float = 300) -> dict[str, Any]:
        """Wait until the server has imported everything; its hello. ForkServerUnavailable (the server is then
        closed) when it will not fork cells here."""
        if self.hello is None:
            try:
                self.hello = self._reply(timeout_s).get("hello") or {}
            except ForkServerUnavailable:
                self.close()
                raise
            self.ready_s = time.monotonic() - self.started
            if not self.hello.get("preloaded"):
                self.close()
                raise ForkServerUnavailable(self.hello.get("reason", "the fork server exited before saying hello"))
            threading.Thread(target=self._read_forever, name="qbench-forkserver", daemon=True).start()
        return self.hello

    @property
    def pid(self) -> int:
        """The server's process id: the parent of every cell it forks."""
        return self._process.pid

    def save_log(self, path: Path) -> str | None:
        """Copy what the server wrote (import warnings, a crash) to `path`, whole or not at all (an atomic
        write); why it could not be written (a full disk), else None. Never raises: the log is kept beside a
        run's records, and a run that ends on a full disk must still say so in its own one line."""
        try:
            self._log.flush()
            self._log.seek(0)
            text = self._log.read()
        except (OSError, ValueError):
            return None
        if not text:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
        except OSError as error:
            return f"cannot write {path}: {error.strerror or error}"
        return None

    # -- the socket ------------------------------------------------------------------------------------
    def _receive(self, timeout_s: float | None) -> dict[str, Any] | None:
        try:
            self._sock.settimeout(timeout_s)
            message, fds = wire.receive(self._sock)
        except TimeoutError:
            raise ForkServerUnavailable(f"the fork server did not answer in {timeout_s:.0f} s") from None
        except (OSError, ValueError):  # the socket is closed, or a torn message: the server is gone either way
            return None
        for fd in fds:
            os.close(fd)
        return message

    def _reply(self, timeout_s: float | None) -> dict[str, Any]:
        message = self._receive(timeout_s)
        if message is None:
            raise ForkServerUnavailable(f"the fork server exited (code {self._process.poll()})")
        return message

    def _read_forever(self) -> None:
        """Exit notices go to the waiters; other messages answer the launch in flight."""
        while True:
            message = self._receive(None)
            with self._exited:
                if message is None:
                    self._closed = True
                    self._exited.notify_all()
                    return
                if "exited" in message:
                    self._exits[int(message["exited"])] = int(message["returncode"])
                else:
                    self._replies.append(message)
                self._exited.notify_all()

    def _request(self, message: dict[str, Any], fds: list[int] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        with self._lock:
            try:
                wire.send(self._sock, message, fds)
            except OSError as error:
                raise ForkServerUnavailable(f"the fork server is gone ({error})") from None
            with self._exited:
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                while not self._replies:
                    if self._closed:
                        raise ForkServerUnavailable(f"the fork server exited (code {self._process.poll()})")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise ForkServerUnavailable(f"the fork server did not answer in {timeout_s:.0f} s")
                    self._exited.wait(left)
                return self._replies.pop(0)

    def _returncode(self, pid: int) -> int | None:
        with self._exited:
            if pid not in self._exits and self._closed:
                self._exits[pid] = -signal.SIGKILL  # the server is gone, and took its children with it
            return self._exits.get(pid)

    def _wait(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._exited:
            while pid not in self._exits and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._exited.wait(left)
        return self._returncode(pid)

    # -- what the runner uses ----------------------------------------------------------------------------
    def warm(self, suite_text: str, suite_path: str, device: str, timeout_s: float = 600) -> dict[str, Any]:
        """Have the server build the suite's run-wide data before any cell forks; its figures, or the error."""
        answer = self._request({"op": "warm", "suite_text": suite_text, "suite_path": suite_path, "device": device},
                               timeout_s=timeout_s)
        self.warmed = answer.get("warmed") or {"error": answer.get("error")}
        return self.warmed

    def start(self, target: Target, env: dict[str, str], stderr: IO[Any]) -> ForkedProcess:
        """Fork `target` from the server with these standard streams (a pipe for stdin, a pipe for stdout, `stderr`)."""
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        try:
            answer = self._request({"op": "fork", "target": target.function, "env": env},
                                   [stdin_read, stdout_write, stderr.fileno()], timeout_s=60)
        finally:
            os.close(stdin_read)
            os.close(stdout_write)
        if "forked" not in answer:
            os.close(stdin_write)
            os.close(stdout_read)
            raise ForkServerUnavailable(f"the fork server could not fork: {answer.get('error')}")
        return ForkedProcess(int(answer["forked"]), open(stdin_write, "w", encoding="utf-8"),  # noqa: SIM115
                             open(stdout_read, encoding="utf-8"), self)  # noqa: SIM115

    def close(self) -> None:
        """Stop the server (it kills any child still running) and wait for it."""
        try:
            wire.send(self._sock, {"op": "close"})  # not the runner's death: the server's cells are stopped, not orphaned
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._closed = True


def run_json_child(server: ForkServerLauncher | None, target: Target, request: dict[str, Any], what: str,
                   env: dict[str, str] | None = None, timeout_s: float = 300, error_key: bool = False) -> dict[str, Any]:
    """Run `target` forked from `server`, or as `python -m` when None, with `request` as JSON on its stdin; the
    last JSON line it printed. RuntimeError naming `what` with its error output when it fails (`error_key`: also
    when the answer holds an "error", which is then the message)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
        if server is not None:
            child: Any = server.start(target, child_env(env), errors)
        else:
            child = subprocess.Popen([sys.executable, "-m", target.module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=errors, text=True, env=child_env(env))
        child.stdin.write(json.dumps(request))
        child.stdin.close()
        output = child.stdout.read()
        child.stdout.close()
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            raise RuntimeError(f"{what} did not finish in {timeout_s:.0f} s") from None
        lines = [line for line in output.splitlines() if line.startswith("{")]
        answer = json.loads(lines[-1]) if lines else {}
        if code != 0 or not lines or (error_key and "error" in answer):
            errors.seek(0)
            raise RuntimeError((answer.get("error") if error_key else None)
                               or f"{what} exited with code {code}: {errors.read().strip()[-800:]}")
        return answer


def run_probe(server: ForkServerLauncher | None, request: dict[str, Any], env: dict[str, str] | None = None,
              timeout_s: float = 300, target: Target = COMPUTE_PROBE) -> dict[str, Any]:
    """Run the compute probe (`target`: qbench.cell.compute_probe, or an executor's stand-in) forked from
    `server`, or as `python -m` when None; its JSON answer. RuntimeError with its error output when it fails."""
    return run_json_child(server, target, request, "the compute probe", env, timeout_s)
