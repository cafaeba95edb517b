"""Ctrl-C / SIGTERM stop a run cleanly; `qbench run --resume RUN_DIR` runs only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import records as results
from qbench.contract.exitcodes import Exit
from qbench.contract.schema import SCHEMA_VERSION
from qbench.contract.suite import Cell, load
from qbench.runner import runner
from qbench.runner.executors.local import LocalExecutor

from .conftest import REPO, write_suite
from .helpers import clip, faults


def write_record(run_dir: Path, cell_id: str, status: str, **fields) -> None:
    precision, seed = cell_id.rsplit("-seed", 1)
    record = {
        "schema_version": SCHEMA_VERSION, "cell_id": cell_id, "precision": precision, "seed": int(seed), "status": status, "suite": "robust",
        "task": "clip", "baseline_precision": "bf16", "quality.eval_after.mean_recall@1": 0.5, **fields,
    }
    results.write_json_atomic(results.record_path(run_dir, cell_id), record)


def test_pending_cells_are_those_without_an_ok_record(tmp_path: Path):
    cells = [Cell(p, 0) for p in ("bf16", "int8", "fp4", "nf4", "nf4-dq", "fp4-dq")]
    write_record(tmp_path, "bf16-seed0", "ok")
    write_record(tmp_path, "int8-seed0", "failed")
    write_record(tmp_path, "fp4-seed0", "running")  # the whole run was killed mid-cell
    write_record(tmp_path, "nf4-seed0", "interrupted")
    results.record_path(tmp_path, "nf4-dq-seed0").write_text('{"status": "ok", ')  # torn by hand, not by qbench
    assert [c.id for c in runner.pending_cells(tmp_path, cells)] == ["int8-seed0", "fp4-seed0", "nf4-seed0", "nf4-dq-seed0", "fp4-dq-seed0"]


@pytest.fixture
def finished_run(tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path) -> tuple[Path, Path]:
    """(suite file, run directory) of a two-cell run whose records are all ok (written by hand: no cell runs)."""
    suite = write_suite(tmp_path, clip.suite(tiny_clip_dir, tsv_data_dir, precisions=("bf16", "nf4"), name="robust"))
    loaded = load(suite)
    run_dir = tmp_path / "out" / "robust" / "run1"
    runner.Run(loaded, run_dir, "cpu", loaded.cells(), LocalExecutor()).write_manifest()
    for cell in loaded.cells():
        write_record(run_dir, cell.id, "ok")
    return suite, run_dir


def test_resume_with_every_cell_ok_runs_nothing(finished_run, capsys):
    _, run_dir = finished_run
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert "resumes" not in json.loads((run_dir / "run.json").read_text())


def test_resume_refuses_a_changed_suite_file_unless_forced(finished_run, capsys):
    suite, run_dir = finished_run
    suite.write_text(suite.read_text() + "# edited\n")
    assert cli.main(["run", "--resume", str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {run_dir / 'run.json'}: the suite file {suite} has changed since this run started")
    assert line.endswith("or pass --force to resume with the recorded suite")
    assert cli.main(["run", "--resume", str(run_dir), "--force"]) == 0
    suite.unlink()
    assert cli.main(["run", "--resume", str(run_dir)]) == 2
    assert "no longer exists since this run started" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(run_dir), "--force"]) == 0


def test_resume_refuses_what_is_not_a_run_directory_or_a_tampered_one(finished_run, tmp_path: Path, capsys):
    suite, run_dir = finished_run
    assert cli.main(["run", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "not a qbench run directory: no readable run.json" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(run_dir), "--only", "bf16", "--device", "cpu"]) == 2
    assert "--resume takes its settings from RUN_DIR/run.json; drop --only, --device" in capsys.readouterr().err
    assert cli.main(["run", str(suite), "--force"]) == 2
    assert "--force only goes with --resume" in capsys.readouterr().err
    manifest = json.loads((run_dir / "run.json").read_text())
    results.write_json_atomic(run_dir / "run.json", {**manifest, "suite_text": manifest["suite_text"] + "\n"})
    assert cli.main(["run", "--resume", str(run_dir)]) == 2
    assert "suite_text: does not match suite_sha256" in capsys.readouterr().err


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def status_of(run_dirs: list[Path], cell_id: str) -> str | None:
    record = results.read_record(results.record_path(run_dirs[0], cell_id)) if run_dirs else None
    return (record or {}).get("status")


@pytest.mark.slow
def test_sigterm_after_the_first_cell_then_resume_gives_the_records_of_an_uninterrupted_run(
    tmp_path: Path, tiny_clip_dir: Path, tsv_data_dir: Path, capsys
):
    suite = write_suite(tmp_path, clip.suite(tiny_clip_dir, tsv_data_dir, precisions=("bf16", "nf4"), steps=3, name="robust"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "reference"), "--device", "cpu"]) == 0
    (reference_dir,) = (tmp_path / "reference" / "robust").iterdir()
    reference = {r["cell_id"]: r for r in results.read_records(reference_dir)}

    # the second cell sleeps in its data phase (the faulty cell of tests/helpers/, which the command line of
    # tests/helpers/qbench_cli.py runs in place of qbench's own), so SIGTERM reaches the run mid-cell
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    command = [sys.executable, "-m", "tests.helpers.qbench_cli", "run", str(suite), "--out", str(out), "--device", "cpu"]
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=stdout, stderr=stderr, env={**env, faults.ENV_VAR: "nf4-seed0:data:sleep:600"}
        )
        try:
            run_dirs = lambda: sorted((out / "robust").glob("*"))  # noqa: E731
            wait_for(lambda: status_of(run_dirs(), "bf16-seed0") == "ok", 300, "the first cell to finish")
            wait_for(lambda: status_of(run_dirs(), "nf4-seed0") == "running", 300, "the second cell to start")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == Exit.SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
    (run_dir,) = run_dirs()
    stopped = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert stopped["bf16-seed0"]["status"] == "ok"
    assert stopped["nf4-seed0"]["status"] == "interrupted" and stopped["nf4-seed0"]["error_phase"] == "data"
    assert stopped["nf4-seed0"]["error"] == "Interrupted: stopped by signal SIGTERM"
    err = (tmp_path / "stderr.txt").read_text()
    assert f"resume with: qbench run --resume {run_dir}" in err and "Traceback" not in err
    assert not list((run_dir / "cells").glob("*.tmp"))  # atomic writes leave no half-written files

    resumed = subprocess.run(
        [sys.executable, "-m", "qbench", "run", "--resume", str(run_dir)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    final = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert final["bf16-seed0"] == stopped["bf16-seed0"]  # the finished cell was not run again
    assert json.loads((run_dir / "run.json").read_text())["resumes"][0]["cells"] == ["nf4-seed0"]
    assert {c for c, r in final.items() if r["status"] == "ok"} == {c for c, r in reference.items() if r["status"] == "ok"} == {
        "bf16-seed0", "nf4-seed0"
    }
    for cell_id, record in final.items():  # the same cells under the same settings give the same numbers
        for key in ("train.final_loss", "quality.eval_after.mean_recall@1", "params.trainable", "weights.load.base_bytes"):
            assert record[key] == pytest.approx(reference[cell_id][key], rel=1e-5), (cell_id, key)
    log = (run_dir / "logs" / "nf4-seed0.log").read_text()  # the log of the stopped try is kept
    assert "nf4-seed0 ended" in log and "interrupted: Interrupted: stopped by signal SIGTERM" in log and log.endswith(", ok ===\n")


def _run_until(tmp_path: Path, faults_spec: str, phase: str, cell: str = "nf4-seed0") -> tuple[subprocess.Popen, Path]:
    """A real run (its own session, as a terminal's job is) whose `cell` waits in `phase` (the faulty cell of
    tests/helpers/); returns the run's process once that cell reached the phase, and its run folder."""
    suite = write_suite(tmp_path, clip.suite(precisions=("bf16", "nf4"), steps=2, name="robust"))
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != faults.ENV_VAR}, faults.ENV_VAR: faults_spec, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.helpers.qbench_cli", "run", str(suite), "--out", str(out), "--device", "cpu"]
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run_dirs = lambda: sorted((out / "robust").glob("*"))  # noqa: E731
    try:
        wait_for(lambda: (results.read_record(results.record_path(run_dirs()[0], cell)) or {}).get("last_phase") == phase
                 if run_dirs() else False, 600, f"{cell} to reach {phase}")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    time.sleep(1.0)
    return process, run_dirs()[0]


@pytest.mark.slow
def test_sighup_to_the_run_s_process_group_stops_it_like_sigterm_naming_sighup(tmp_path: Path):
    """Closing the terminal (case sighup-leaves-running-record): every process of the job gets SIGHUP."""
    process, run_dir = _run_until(tmp_path, "nf4-seed0:train:sleep:300", "train")
    try:
        os.killpg(process.pid, signal.SIGHUP)
        assert process.wait(timeout=180) == Exit.SIGHUP
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stopped = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert stopped["bf16-seed0"]["status"] == "ok"
    assert stopped["nf4-seed0"]["status"] == "interrupted" and stopped["nf4-seed0"]["error"] == "Interrupted: stopped by signal SIGHUP"
    log = (tmp_path / "run.log").read_text()
    assert "run stopped by SIGHUP during cell nf4-seed0" in log and f"resume with: qbench run --resume {run_dir}" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_sigint_to_the_parent_alone_is_recorded_as_sigint(tmp_path: Path):
    process, run_dir = _run_until(tmp_path, "nf4-seed0:train:sleep:300", "train")
    try:
        process.send_signal(signal.SIGINT)  # the parent only: the runner stops the cell with the same signal
        assert process.wait(timeout=180) == Exit.SIGINT
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    record = results.read_record(results.record_path(run_dir, "nf4-seed0"))
    assert record["status"] == "interrupted" and record["error"] == "Interrupted: stopped by signal SIGINT"


@pytest.mark.slow
def test_a_killed_fork_server_is_named_in_the_record_of_the_cell_it_took_and_the_run_goes_on(tmp_path: Path):
    import psutil

    process, run_dir = _run_until(tmp_path, "bf16-seed0:train:sleep:300", "train", cell="bf16-seed0")
    try:
        server = next(p for p in psutil.Process(process.pid).children() if "qbench.runner.forkserver" in " ".join(p.cmdline()))
        server.kill()  # as the OOM killer would
        assert process.wait(timeout=600) == Exit.FAILED  # the run went on: nf4 ran as a plain subprocess
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert records["nf4-seed0"]["status"] == "ok" and records["nf4-seed0"]["env.cell_launcher"] == "subprocess"
    assert records["bf16-seed0"]["status"] == "interrupted"
    assert records["bf16-seed0"]["error"] == (f"Interrupted: stopped by signal SIGTERM, the parent-death signal: its parent process "
                                              f"(pid {server.pid}) ended")
