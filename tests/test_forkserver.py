"""Cells forked from the run's fork server are still fresh processes that measure only themselves, split
their wall time into parts that add up, and give the same results as plain subprocesses.

One real run of the builtin tiny CLIP (two precisions, two seeds) through the command line; the first
cell holds 300 MiB more while it trains (a test fault planted by tests/helpers/faulty_cell.py, forked from the
server like qbench's own cell), which no later cell may see.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import records as results
from qbench.contract.schema import ON_REQUEST_PHASES, TIME_PARTS

from .conftest import write_suite
from .helpers import clip, executors, faults

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
HELD_MIB = 300

SUITE = clip.suite(
    precisions=("dense", "nf4"), name="forked", matrix="seeds = [0, 1]", steps=4,
    train="batch_size = 16\nlr = 1e-3\nuntimed_steps = 1", lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]', evaluation=None,
)


def _run(folder: Path, *options: str, faults_value: str | None = None) -> tuple[dict[str, dict], dict]:
    suite = write_suite(folder, SUITE)
    with pytest.MonkeyPatch.context() as patch:
        if faults_value:  # the real pipeline with the fault planted (tests/helpers/faulty_cell.py), forked as qbench's
            executors.use(patch, executors.FAULTY)
            patch.setenv(faults.ENV_VAR, faults_value)
        assert cli.main(["run", str(suite), "--out", str(folder / "out"), "--device", "cpu", *options]) == 0
    (run_dir,) = (folder / "out" / "forked").iterdir()
    manifest = json.loads((run_dir / "run.json").read_text())
    return {r["cell_id"]: r for r in results.read_records(run_dir)}, manifest


@pytest.fixture(scope="module")
def forked(tmp_path_factory) -> tuple[dict[str, dict], dict]:
    return _run(tmp_path_factory.mktemp("forked"), "--threads", "1", "--launcher", "forkserver",
                faults_value=f"dense-seed0:train:alloc:{HELD_MIB}")


def test_every_cell_is_a_fresh_process_forked_from_the_run_s_server(forked):
    records, manifest = forked
    assert list(records) == ["dense-seed0", "dense-seed1", "nf4-seed0", "nf4-seed1"]
    assert {r["status"] for r in records.values()} == {"ok"}
    assert {r["env.cell_launcher"] for r in records.values()} == {"forkserver"} and manifest["cell_launcher"] == "forkserver"
    pids = {r["env.pid"] for r in records.values()}
    assert len(pids) == 4 and os.getpid() not in pids


def test_each_cell_measures_only_itself_from_the_same_starting_state(forked):
    records, _ = forked
    # every cell starts from the server's state: the same resident memory before its data phase
    starts = [r["memory.data.rss_peak_bytes"] for r in records.values()]
    assert max(starts) - min(starts) < 16 * MiB, [s / MiB for s in starts]
    held, alone = records["dense-seed0"], records["dense-seed1"]
    # the cell that held 300 MiB measured them, in its train phase ...
    assert held["memory.train.rss_peak_bytes"] - alone["memory.train.rss_peak_bytes"] > (HELD_MIB - 30) * MiB
    assert held["test.injected_faults"] and "test.injected_faults" not in alone
    # ... and the cells after it (nf4-seed0 ran next) did not inherit them
    for later in ("nf4-seed0", "dense-seed1", "nf4-seed1"):
        assert records[later]["memory.all_phases.rss_peak_bytes"] < held["memory.train.rss_peak_bytes"] - (HELD_MIB - 30) * MiB


def test_the_parts_of_a_cell_add_up_to_its_wall_time(forked):
    records, manifest = forked
    for record in records.values():
        # the phases a suite asks for (an init, the merges) are parts only where they ran
        parts = [record[f"time.{part}.wall_s"] for part in TIME_PARTS if part not in ON_REQUEST_PHASES or f"time.{part}.wall_s" in record]
        assert all(isinstance(p, float) and p >= 0 for p in parts), record["cell_id"]
        assert record["time.other.wall_s"] >= 0
        assert math.isclose(sum(parts) + record["time.other.wall_s"], record["time.cell.wall_s"], rel_tol=1e-9)
        # and no other time.*_s field: a reader summing them all gets the wall time, nothing counted twice
        every = [v for k, v in record.items() if k.startswith("time.") and k.endswith("_s") and k != "time.cell.wall_s"]
        assert math.isclose(sum(every), record["time.cell.wall_s"], rel_tol=1e-9), sorted(record)
    assert manifest["timing"]["run_wall_s"] >= sum(r["time.cell.wall_s"] for r in records.values())


def test_records_say_which_compute_dtype_and_threads_and_why(forked):
    records, manifest = forked
    dtype = manifest["compute"]["dtype"]
    for record in records.values():
        assert record["config.compute_dtype"] == dtype and record["compute.dtype_setting"] == "auto"
        assert record["compute.dtype_reason"].startswith("auto: ")
        assert record["env.torch_threads"] == 1 and record["env.threads_source"] == "--threads"
        assert record["speed.timed_cpu_s"] > 0 and record["speed.train_samples_per_cpu_s"] > 0
        assert record["speed.contended"] in (True, False) and record["speed.contention"]
        assert 0 <= record["cpu.train.share"] <= 1
    assert records["dense-seed0"]["precision.dense_dtype"] == dtype


def test_the_data_is_built_once_by_the_server_and_images_preprocessed_once(forked):
    records, manifest = forked
    assert any(key.startswith("shapes split") for key in manifest["shared"])
    assert any(key.startswith("clip pixels") for key in manifest["shared"])
    assert all(r["data.images_preprocessed_once"] for r in records.values())


def test_a_forked_cell_gives_the_results_of_a_plain_subprocess(forked, tmp_path):
    records, _ = forked
    plain, manifest = _run(tmp_path, "--threads", "1", "--launcher", "subprocess", "--only", "nf4", "--seeds", "1")
    (cell,) = plain.values()
    assert cell["env.cell_launcher"] == "subprocess" and manifest["cell_launcher"] == "subprocess"
    forked_cell = records["nf4-seed1"]
    for key in ("train.final_loss", "quality.eval_after.mean_recall@1", "quality.eval_before.mean_recall@1", "weights.load.base_bytes"):
        assert cell[key] == forked_cell[key], key
