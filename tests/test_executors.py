"""The executor protocol (qbench.runner.executors.base), checked with an executor whose cells are scripts played
in this process: what the runner does with whatever an executor reports (records kept or made for cells that
died, where they ran, the listener, run.json, the tables, interruption), and the registry of names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qbench.contract import records as results
from qbench.contract.exitcodes import Exit
from qbench.contract.protocol import identity_fields
from qbench.contract.suite import SuiteError
from qbench.runner import api, executors
from qbench.runner.executors.base import Executor, Placement, ProcessExecutor, Request

from .conftest import REPO, write_suite
from .helpers import clip


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("protocol")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=6, eval_images=3)
    return write_suite(root, clip.suite(checkpoint, data, ("bf16", "int8", "nf4"), name="scripted", steps=2,
                                        train="batch_size = 4\nlr = 1e-3\nuntimed_steps = 1", evaluation=None))


class ScriptedCell:
    """A cell played in this process: its events, then (as `script` says) its record, a death, or a hold."""

    def __init__(self, run, cell, attempt: str, script: dict[str, Any]):
        self.run, self.cell, self.attempt, self.script = run, cell, attempt, script
        self.last_phase: str | None = None
        self.fields = {"test.scripted_where": f"stage {cell.id}"}  # an executor's own fields: declared in the record model, or test.*
        self.failure = script.get("failure")
        self.wall_s = 2.5
        self.returncode: int | None = None
        self.stopped = threading.Event()

    def _write(self, record: dict[str, Any]) -> None:
        results.write_record(results.record_path(self.run.run_dir, self.cell.id), record, self.attempt)

    def events(self):
        identity = identity_fields(self.run.loaded, self.run.run_id, self.cell)
        for phase in ("load", "train"):
            self.last_phase = phase
            self._write({**identity, "status": "running", "last_phase": phase, "weights.load.base_bytes": 1234})
            yield {"event": "phase", "phase": phase}
        if self.script.get("hold"):  # until stopped, then gone without a record of its own
            self.stopped.wait(60)
            return
        if "returncode" not in self.script:
            self._write({**identity, "status": "ok", "last_phase": "done", "weights.load.base_bytes": 1234})

    def wait(self) -> int | None:
        self.returncode = self.script.get("returncode", 0)
        return self.returncode

    def terminate(self, sig: int = 15) -> None:
        self.stopped.set()

    def stop(self) -> None:
        self.stopped.set()


class ScriptedExecutor(ProcessExecutor):
    name = "scripted"
    launcher = "script"
    places_cells = True

    def __init__(self, scripts: dict[str, dict[str, Any]] | None = None):
        self.scripts = scripts or {}
        self.launched: list[str] = []
        self.closed_with: list[Path | None] = []

    def prepare(self, request: Request) -> Placement:
        request.check(None)
        return Placement(device="cpu", where="a script", threads=request.threads, manifest={"scripted": {"cells": len(request.cells)}})

    def launch(self, run, cell, env, log, attempt):
        self.launched.append(cell.id)
        return ScriptedCell(run, cell, attempt, self.scripts.get(cell.id, {}))

    def close(self, run_dir=None):
        self.closed_with.append(run_dir)


class Heard:
    def __init__(self):
        self.log: list[tuple[str, Any]] = []

    def run_started(self, started):
        self.log.append(("run", started.where))

    def cell_started(self, cell, index, total):
        self.log.append(("started", cell.id))

    def cell_event(self, cell, event):
        self.log.append(("event", (cell.id, event.get("phase"))))

    def cell_finished(self, cell, record):
        self.log.append(("finished", (cell.id, record["status"])))


def test_records_an_executor_leaves_are_kept_and_said_where_they_ran(suite, tmp_path):
    executor, heard = ScriptedExecutor(), Heard()
    result = api.run_suite(suite, out=tmp_path, executor=executor, listener=heard)

    assert result.exit_code == Exit.OK and executor.launched == ["bf16-seed0", "int8-seed0", "nf4-seed0"]
    records = {r["cell_id"]: r for r in result.records}
    for cell_id, record in records.items():
        assert record["status"] == "ok" and record["test.scripted_where"] == f"stage {cell_id}"  # the executor's fields
        assert record["env.cell_launcher"] == "script" and record["time.cell.wall_s"] == 2.5  # its launcher, its wall time
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["executor"] == "scripted" and manifest["scripted"] == {"cells": 3}
    assert result.tables["csv"].is_file() and result.tables["summary"].is_file()
    assert executor.closed_with == [result.run_dir]
    assert heard.log[0] == ("run", "a script")
    assert heard.log[1:6] == [("started", "bf16-seed0"), ("event", ("bf16-seed0", "load")), ("event", ("bf16-seed0", "train")),
                              ("finished", ("bf16-seed0", "ok")), ("started", "int8-seed0")]


def test_a_cell_that_ends_without_its_record_is_recorded_failed_with_what_it_had_measured(suite, tmp_path):
    executor = ScriptedExecutor({"int8-seed0": {"returncode": -9},
                                 "nf4-seed0": {"returncode": None, "failure": {"error_type": "ItsJobDied", "error": "node lost"}}})
    result = api.run_suite(suite, out=tmp_path, executor=executor)

    assert result.exit_code == Exit.FAILED
    assert result.failed == ["int8-seed0 (failed: ChildProcessDied)", "nf4-seed0 (failed: ItsJobDied)"]
    killed = results.read_record(results.record_path(result.run_dir, "int8-seed0"))
    assert killed["error"].startswith("cell process was killed by signal SIGKILL (last phase: train)")
    assert killed["error_returncode"] == -9 and killed["error_phase"] == "train"
    assert killed["weights.load.base_bytes"] == 1234 and killed["env.executor"] == "scripted"  # its checkpoint's figures kept
    lost = results.read_record(results.record_path(result.run_dir, "nf4-seed0"))
    assert lost["error_type"] == "ItsJobDied" and lost["error"] == "node lost" and lost["test.scripted_where"] == "stage nf4-seed0"
    assert results.read_record(results.record_path(result.run_dir, "bf16-seed0"))["status"] == "ok"
    summary = (result.run_dir / "summary.md").read_text()
    assert "int8-seed0" in summary and "ItsJobDied" in summary


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_every_stop_signal_reaches_every_executor_as_one_interrupt_and_the_running_cell_is_recorded_interrupted(
        suite, tmp_path, stop):
    executor = ScriptedExecutor({"int8-seed0": {"hold": True}})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}

    def stop_when_int8_holds() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and executor.launched[-1:] != ["int8-seed0"]:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), stop)

    threading.Thread(target=stop_when_int8_holds, daemon=True).start()
    result = api.run_suite(suite, out=tmp_path, executor=executor)

    assert result.exit_code == 128 + stop  # 143, 129, 130, as a shell reports them
    assert result.interrupted.startswith(f"run stopped by {stop.name} during cell int8-seed0")
    records = {r["cell_id"]: r for r in results.read_records(result.run_dir)}
    assert {cell: r["status"] for cell, r in records.items()} == {"bf16-seed0": "ok", "int8-seed0": "interrupted"}  # nf4 never started
    assert records["int8-seed0"]["error"].startswith(f"cell process was stopped because the run was interrupted by {stop.name}")
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers and executor.closed_with == [result.run_dir]


def test_an_executor_that_cannot_run_here_stops_the_run_before_any_folder(suite, tmp_path):
    class Refusing(ScriptedExecutor):
        def prepare(self, request):
            raise SuiteError("command line", ["--executor scripted: the stage is dark"])

    with pytest.raises(SuiteError, match="the stage is dark"):
        api.run_suite(suite, out=tmp_path / "out", executor=Refusing())
    assert not (tmp_path / "out").exists()


def test_executors_are_chosen_by_name_and_an_unknown_name_is_one_line_with_a_hint():
    assert set(executors.REGISTRY) == {"local", "forkserver", "subprocess", "ray", "slurm"}
    for name in executors.REGISTRY:
        cls = executors.get(name)
        assert issubclass(cls, Executor) and cls.name in ("local", "ray", "slurm")
    assert type(executors.create("forkserver")).__name__ == "ForkServerExecutor"
    with pytest.raises(SuiteError) as unknown:
        executors.get("slurn")
    assert unknown.value.problems == ["--executor: unknown executor 'slurn' (did you mean 'slurm'?); known: local, forkserver, "
                                      "subprocess, ray, slurm"]


def test_naming_every_executor_imports_neither_ray_nor_submitit():
    script = ("import sys\nfrom qbench.runner import executors\n"
              "[executors.get(name) for name in executors.REGISTRY]\n"
              "assert 'ray' not in sys.modules and 'submitit' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def test_no_module_of_the_package_knows_the_tests_cells():
    """Test hooks live in tests/: the package never asks whether a cell is qbench's own or plants faults."""
    package = REPO / "qbench"
    text = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    for hook in ("QBENCH_TEST_FAULTS", "is_qbench_cell", "CELL_COMMAND", "fake_cell", "faulty_cell"):
        assert hook not in text, hook
    assert not (package / "cell" / "faults.py").exists()
