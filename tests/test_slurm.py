"""`qbench run --executor slurm`: each cell a job through submitit. This machine has no SLURM, so submitit's
AutoExecutor runs each job here, in a process of its own (its "local" cluster) through the same code a SLURM
cluster runs; checked with the stand-in cell (tests/fake_cell.py) and, in the slow tier, real cells."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from qbench import cli
from qbench.contract import records as results
from qbench.contract.exitcodes import Exit
from qbench.runner import api
from qbench.runner.executors.slurm import SlurmCell

from .conftest import write_suite
from .helpers import clip, executors

submitit = pytest.importorskip("submitit", reason='the slurm extra is not installed (pip install "qbench[slurm]")')
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def tsv_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-suite")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=6, eval_images=3)
    text = clip.suite(checkpoint, data, ("bf16", "int8", "nf4"), name="onslurm", steps=2,
                      train="batch_size = 4\nlr = 1e-3\nuntimed_steps = 1", evaluation=None)
    return write_suite(root, text)


def fake_slurm(**options):
    return executors.fake_cells_on_slurm()(cluster="local", **options)


class Heard:
    """A listener that keeps what it hears."""

    def __init__(self):
        self.log: list[tuple[str, str, object]] = []

    def run_started(self, started):
        self.log.append(("run", started.suite, started.where))

    def cell_started(self, cell, index, total):
        self.log.append(("started", cell.id, index))

    def cell_event(self, cell, event):
        self.log.append(("event", cell.id, event))

    def cell_finished(self, cell, record):
        self.log.append(("finished", cell.id, record["status"]))


def test_without_srun_submitit_picks_its_local_cluster():
    from qbench.runner.executors.slurm import SlurmExecutor

    assert SlurmExecutor().cluster == ("slurm" if submitit.AutoExecutor.which() == "slurm" else "local")


def test_each_cell_is_a_local_job_of_its_own_and_its_record_comes_back_as_a_local_run_writes_it(tsv_suite, fake_cells, tmp_path):
    heard = Heard()
    result = api.run_suite(tsv_suite, out=tmp_path / "out", executor=fake_slurm(), device="cpu", listener=heard)

    assert result.exit_code == Exit.OK and result.failed == []
    records = {r["cell_id"]: r for r in results.read_records(result.run_dir)}
    assert list(records) == ["bf16-seed0", "int8-seed0", "nf4-seed0"] and {r["status"] for r in records.values()} == {"ok"}
    for record in records.values():
        assert record["env.executor"] == "slurm" and record["env.cell_launcher"] == "subprocess"
        assert record["env.slurm.cluster"] == "local" and record["env.slurm.job_id"]
        assert record["test.peak_running"] == 1  # one job at a time on this machine: cells do not measure each other
    assert len({r["test.pid"] for r in records.values()} | {os.getpid()}) == 4  # a process per cell, none of them this one
    assert len({r["env.slurm.job_id"] for r in records.values()}) == 3
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["executor"] == "slurm" and manifest["slurm"]["cluster"] == "local" and manifest["cell_launcher"] == "subprocess"
    assert (result.run_dir / "results.csv").is_file() and (result.run_dir / "summary.md").is_file()
    for cell_id in records:  # the job appended the cell's output between the runner's header and footer
        log = (result.run_dir / "logs" / f"{cell_id}.log").read_text()
        assert log.startswith(f"=== qbench: cell {cell_id} started") and log.rstrip().endswith(", ok ===")
    # the progress came back from each job as it ran: the phases and the step, attributed to their cell
    assert heard.log[0][0] == "run" and "SLURM jobs through submitit" in heard.log[0][2]
    for cell_id in records:
        mine = [entry for entry in heard.log if entry[1] == cell_id]
        assert [kind for kind, _, _ in mine][0] == "started" and mine[-1] == ("finished", cell_id, "ok")
        assert [e["phase"] for kind, _, e in mine if kind == "event" and e.get("event") == "phase"] == ["load", "train"]
        assert any(kind == "event" and e.get("event") == "step" for kind, _, e in mine)


def test_a_cell_that_dies_in_its_job_is_recorded_failed_and_the_run_goes_on(tsv_suite, fake_cells, tmp_path):
    fake_cells.setenv("FAKE_CELL_CRASH", "int8")
    result = api.run_suite(tsv_suite, out=tmp_path / "out", executor=fake_slurm(), device="cpu")
    assert result.exit_code == Exit.FAILED and result.failed == ["int8-seed0 (failed: ChildProcessDied)"]
    crashed = results.read_record(results.record_path(result.run_dir, "int8-seed0"))
    assert crashed["error_returncode"] == 3 and crashed["error_phase"] == "train" and crashed["env.executor"] == "slurm"
    assert crashed["env.slurm.job_id"] and "exited with code 3" in crashed["error"]
    assert {r["status"] for r in results.read_records(result.run_dir) if r["cell_id"] != "int8-seed0"} == {"ok"}


@pytest.mark.slow
def test_sigterm_cancels_the_running_job_records_it_interrupted_and_resume_finishes_it(tsv_suite, fake_cells, tmp_path):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "300")
    running = tmp_path / "fake" / "running"
    signalled: list[float] = []

    def terminate_when_a_cell_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if running.is_dir() and list(running.iterdir()):
                signalled.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=terminate_when_a_cell_runs, daemon=True).start()
    result = api.run_suite(tsv_suite, out=tmp_path / "out", executor=fake_slurm(), device="cpu")
    # the 300 s hold was cut short: the stop's own time, from the signal, not the job's start under load
    assert result.exit_code == Exit.SIGTERM and time.monotonic() - signalled[0] < 120
    assert "run stopped by SIGTERM during cell bf16-seed0" in result.interrupted
    assert {r["cell_id"]: r["status"] for r in results.read_records(result.run_dir)} == {"bf16-seed0": "interrupted"}

    fake_cells.setenv("FAKE_CELL_HOLD_S", "0")
    resumed = api.resume_run(result.run_dir, executor=fake_slurm())
    assert resumed.exit_code == Exit.OK
    records = results.read_records(result.run_dir)
    assert len(records) == 3 and {r["env.executor"] for r in records} == {"slurm"}
    assert json.loads((result.run_dir / "run.json").read_text())["resumes"][0]["executor"] == "slurm"


@pytest.mark.slow  # about 20 s each: a real job started, stopped and cancelled (SIGTERM: the test above)
@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGINT])
def test_every_stop_signal_cancels_the_running_job_and_its_record_names_it(tsv_suite, fake_cells, tmp_path, stop):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "60")
    running = tmp_path / "fake" / "running"

    def stop_when_a_cell_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if running.is_dir() and list(running.iterdir()):
                os.kill(os.getpid(), stop)
                return
            time.sleep(0.05)

    threading.Thread(target=stop_when_a_cell_runs, daemon=True).start()
    result = api.run_suite(tsv_suite, out=tmp_path / "out", executor=fake_slurm(), device="cpu")
    assert result.exit_code == 128 + stop and f"run stopped by {stop.name} during cell bf16-seed0" in result.interrupted
    (record,) = results.read_records(result.run_dir)
    assert record["status"] == "interrupted" and f"stopped by signal {stop.name}" in record["error"]


def test_slurm_options_that_do_not_fit_exit_2_before_any_cell(tsv_suite, tmp_path, capsys):
    cases = {
        ("--executor", "slurm", "--ray-address", "auto"): "--ray-address goes with --executor ray",
        ("--slurm-partition", "gpu"): "--slurm-partition goes with --executor slurm",
        ("--executor", "slurm", "--gpus", "0"): "--gpus picks GPUs of this machine",
        ("--executor", "slurm", "--cpus-per-cell", "0.5"): "a SLURM job asks for a whole number of CPUs",
        ("--executor", "slurm", "--slurm-option", "account"): "--slurm-option 'account': expected KEY=VALUE",
        ("--executor", "slurm", "--slurm-option", "colour=blue", "--device", "cpu"): "--slurm-option: ",
    }
    for options, message in cases.items():
        assert cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), *options]) == 2, options
        assert message in " ".join(capsys.readouterr().err.split()), options
    assert not list((tmp_path / "out").rglob("cells/*.json"))  # no cell ran


@pytest.mark.parametrize("scontrol, sinfo, message", [
    ("sleep 60", "", "--executor slurm: the SLURM controller does not answer: `scontrol ping` did not answer in 1 s"),
    ("echo 'Slurm controller slurmctld (primary) at head is DOWN'; exit 1", "",
     "--executor slurm: the SLURM controller does not answer: `scontrol ping` failed (exit 1: Slurm controller"),
    ("echo 'Slurm controller slurmctld (primary) at head is UP'", "true",
     "--slurm-partition gpu: SLURM has no such partition"),
    ("echo 'Slurm controller slurmctld (primary) at head is UP'", "sleep 60",
     "--slurm-partition gpu: SLURM could not say whether it has this partition: `sinfo --noheader --partition gpu --format %P` "
     "did not answer in 1 s"),
])
def test_a_slurm_controller_that_does_not_answer_stops_the_run_in_bounded_time(tsv_suite, tmp_path, monkeypatch,
                                                                                scontrol, sinfo, message):
    from qbench.contract.suite import SuiteError
    from qbench.runner.executors import slurm

    tools = tmp_path / "bin"
    tools.mkdir()
    for name, body in (("scontrol", scontrol), ("sinfo", sinfo)):
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "PROBE_TIMEOUT_S", 1.0)
    started = time.monotonic()
    with pytest.raises(SuiteError) as refused:
        api.run_suite(tsv_suite, out=tmp_path / "out", executor=slurm.SlurmExecutor(cluster="slurm", partition="gpu"),
                      device="cpu")
    assert refused.value.problems[0].startswith(message)
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()


def test_without_submitit_installed_executor_slurm_exits_2_with_one_line(tsv_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails as if it were not installed
    assert cli.main(["run", str(tsv_suite), "--out", str(tmp_path / "out"), "--executor", "slurm"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("error: command line: --executor slurm: submitit is not installed here")
    assert 'pip install "qbench[slurm]"' in error and not (tmp_path / "out").exists()


# --- real cells: a record does not depend on how its process was started ------------------------

VOLATILE = ("time.", "speed.", "memory.", "cpu.", "env.", "run_id", "run_session", "error_traceback", "model_path", "readback.weight_error_s")


@pytest.mark.slow
def test_real_cells_as_local_jobs_give_the_records_and_memory_of_plain_subprocesses(tmp_path, monkeypatch):
    suite = write_suite(tmp_path, clip.suite(precisions=("dense", "nf4"), name="same", steps=3))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--device", "cpu", "--only", "nf4"]
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "local"), *common, "--executor", "subprocess"]) == 0
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "slurm"), *common, "--executor", "slurm"]) == 0
    (local,) = results.read_records(next((tmp_path / "local" / "same").iterdir()))
    (job,) = results.read_records(next((tmp_path / "slurm" / "same").iterdir()))
    assert {k: v for k, v in job.items() if not k.startswith(VOLATILE)} == {k: v for k, v in local.items() if not k.startswith(VOLATILE)}
    assert job["env.executor"] == "slurm" and local["env.executor"] == "local"
    assert job["env.cell_launcher"] == local["env.cell_launcher"] == "subprocess"
    assert "quality.eval_after.mean_recall@1" in job and job["weights.load.base_bytes"] == local["weights.load.base_bytes"]
    # the memory is the cell's own process's, not its job's: within the noise of two fresh processes
    for key in ("memory.all_phases.pss_peak_bytes", "memory.all_phases.rss_peak_bytes", "memory.process_baseline.pss_bytes"):
        assert abs(job[key] - local[key]) < 0.15 * local[key], (key, job[key], local[key])
    assert 0 <= job["time.other.wall_s"] < job["time.cell.wall_s"]


class _Job:
    """A submitit job as SlurmCell sees it, done, whose outcome file exists or not."""

    job_id = "7"

    def __init__(self, result_pickle: Path, outcome: dict | None = None):
        self.paths = SimpleNamespace(result_pickle=result_pickle)
        self.outcome = outcome
        self.cancels = 0

    def done(self) -> bool:
        return True

    def cancel(self, check: bool = True) -> None:
        self.cancels += 1

    def result(self) -> dict:
        if self.outcome is None:  # submitit's own result() would poll for the file for 15 s, then raise
            raise AssertionError("waited for the outcome of a job that left none")
        return self.outcome


def test_a_cancelled_local_job_that_left_no_outcome_is_not_waited_for_and_one_that_did_is_read(tmp_path):
    cancelled = SlurmCell(_Job(tmp_path / "7_result.pkl"), tmp_path / "events", {}, local=True)
    cancelled.terminate(signal.SIGINT)
    assert cancelled.job.cancels == 1
    assert cancelled.wait() is None and cancelled.failure == {"error_type": "SlurmJobCancelled",
                                                              "error": "the job 7 was cancelled"}
    (tmp_path / "7_result.pkl").write_bytes(b"kept")  # it ended as it was cancelled: its outcome is read
    ended = SlurmCell(_Job(tmp_path / "7_result.pkl", {"returncode": 0, "last_phase": "eval_after", "wall_s": 1.5}),
                      tmp_path / "events", {}, local=True)
    ended.terminate()
    assert ended.wait() == 0 and ended.failure is None and ended.wall_s == 1.5
    # a job not cancelled is asked for its outcome however long that takes (a shared file system may lag), and so
    # is a cancelled job on SLURM, which may still write its outcome after sacct says CANCELLED
    (tmp_path / "7_result.pkl").unlink()
    uncancelled = SlurmCell(_Job(tmp_path / "7_result.pkl"), tmp_path / "events", {}, local=True)
    assert uncancelled.wait() is None and "waited for the outcome" in uncancelled.failure["error"]
    on_slurm = SlurmCell(_Job(tmp_path / "7_result.pkl"), tmp_path / "events", {}, local=False)
    on_slurm.terminate()
    assert on_slurm.wait() is None and "waited for the outcome" in on_slurm.failure["error"]
