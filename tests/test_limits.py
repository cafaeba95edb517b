"""A machine or shell limit hit while qbench works is said in one line naming what ran out, the step and the
limit, with exit 2: never a traceback, never blamed on an input (case address-space-limit-traceback)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from qbench import cli
from qbench.cli import commands
from qbench.contract.exitcodes import Exit
from qbench.machine import limits

from .conftest import REPO, write_suite
from .helpers import clip


@pytest.mark.parametrize("error, said", [
    (MemoryError(), "out of memory in qbench.cli.main"),  # the innermost qbench function: the stand-in is the test's
    (RuntimeError("can't start new thread"), "could not start a thread in qbench.cli.main"),
    (ImportError("libtorch_cpu.so: failed to map segment from shared object"), "out of memory in qbench.cli.main"),
    (OSError(12, "Cannot allocate memory"), "out of memory in qbench.cli.main"),
])
def test_running_out_of_memory_or_threads_in_any_command_is_one_line_and_exit_2(monkeypatch, capfd, error, said):
    def run_out(args):
        raise error

    monkeypatch.setattr(commands, "cmd_list", run_out)
    monkeypatch.setattr(limits, "address_space_limit", lambda: 700_000_000)
    assert cli.main(["list"]) == Exit.BAD_INPUT
    err = capfd.readouterr().err
    assert err.startswith(f"error: {said}: under this process's address-space limit of 700,000,000 bytes")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_step_is_the_innermost_qbench_function():
    from qbench.cell.data import lines

    try:
        lines.raise_problems(None)  # TypeError raised inside qbench.cell.data.lines
    except TypeError as error:
        assert limits.step_of(error.__traceback__) == "qbench.cell.data.lines.raise_problems"


def test_other_errors_are_not_taken_for_a_limit():
    assert limits.exhausted(RuntimeError("boom")) is None and limits.exhausted(ImportError("No module named x")) is None
    assert limits.exhausted(OSError(2, "No such file or directory")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux keeps it")
@pytest.mark.parametrize("limit", [600_000_000, 750_000_000])  # 750 MB: torch's own import aborted the process
def test_a_run_under_an_address_space_limit_too_low_for_torch_is_refused_before_any_import(tmp_path: Path, limit: int):
    suite = write_suite(tmp_path, clip.suite(precisions=("bf16",)))

    def lower_the_limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "qbench", "run", str(suite), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=lower_the_limit,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == Exit.BAD_INPUT, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: ulimit -v: this process's address-space limit is {limit:,} bytes (ulimit -v / prlimit --as), below the "
        "2 GiB torch and the smallest model need; raise it (ulimit -v 2097152 or more, in KiB) or run where it is unlimited"]
    assert not (tmp_path / "out").exists()
