"""A cell dies with its parent: SIGKILL of `qbench run` (no chance to stop its cells) while a cell is in its
load, train or eval phase stops the cell process too (Linux parent-death signal), the cell leaves an
`interrupted` record, and a resume that follows is never overwritten by a leftover of the killed run.

Real cells of the builtin tiny CLIP; a test-only fault (QBENCH_TEST_FAULTS ... :sleep, planted by the faulty cell
that tests/helpers/qbench_cli.py runs in place of qbench's own) holds the cell in the phase while the parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qbench.contract import records as results

from .conftest import REPO, write_suite
from .helpers import clip, faults


def record_of(out: Path) -> dict | None:
    found = sorted(out.glob("tiny/*/cells/bf16-seed0.json"))
    return results.read_record(found[0]) if found else None


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("phase", ["load", "train", "eval_after"])
def test_sigkill_of_the_parent_stops_its_cell_and_a_resume_keeps_its_own_record(tmp_path: Path, phase: str):
    suite = write_suite(tmp_path, clip.suite(precisions=("bf16",), name="tiny"))
    out = tmp_path / "out"
    sleeping = tmp_path / "sleeping"
    sleeping.mkdir()
    env = {**os.environ, faults.ENV_VAR: f"bf16-seed0:{phase}:sleep:300", faults.SLEEPING_ENV_VAR: str(sleeping), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.helpers.qbench_cli", "run", str(suite), "--out", str(out), "--device", "cpu"]
    with open(tmp_path / "run.log", "w") as log:
        parent = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    cell_processes: list[psutil.Process] = []
    try:
        wait_for(lambda: (record_of(out) or {}).get("last_phase") == phase, 600, f"the cell to reach {phase}")
        wait_for(lambda: any(sleeping.glob(f"{phase}.*")), 600, f"the cell to sleep in its {phase} phase")
        cell_processes += psutil.Process(parent.pid).children(recursive=True)
        assert cell_processes, "no cell process to watch"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs(cell_processes, timeout=60)
        assert not alive, f"cell processes outlived their parent: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for process in cell_processes:  # never leave a cell of this test running (an orphan is no child of ours)
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    record = record_of(out)
    assert record["status"] == "interrupted" and record["error_phase"] == phase
    assert record["error"].startswith("Interrupted: stopped by signal SIGTERM, the parent-death signal: ")  # and whose death
    if phase != "load":
        return
    (run_dir,) = (out / "tiny").iterdir()
    clean = {k: v for k, v in env.items() if k not in (faults.ENV_VAR, faults.SLEEPING_ENV_VAR)}
    resumed = subprocess.run([sys.executable, "-m", "qbench", "run", "--resume", str(run_dir)], cwd=REPO, env=clean,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert record_of(out)["status"] == "ok"
    assert results.current_attempt(results.record_path(run_dir, "bf16-seed0")) is not None
