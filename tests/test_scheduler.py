"""Cells across GPUs and machines, checked with fake devices: slots, CUDA_VISIBLE_DEVICES per cell, shards."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis import load as frames
from qbench.analysis.report import tables
from qbench.contract import records as results
from qbench.contract.suite import Cell, load
from qbench.runner import runner, scheduler
from qbench.runner.scheduler import Slot

from . import fake_cell
from .conftest import write_suite
from .helpers import clip
from .helpers.executors import FakeCells
from .helpers.listeners import RecordingListener

CELLS = [Cell(p, s) for s in (0, 1) for p in ("bf16", "int8", "nf4")]


# --- the scheduler itself, with threads standing in for cell processes -------------------------


def test_cells_run_concurrently_up_to_the_number_of_slots_and_records_keep_cell_order():
    slots = [Slot("gpu 0", {"CUDA_VISIBLE_DEVICES": "0"}), Slot("gpu 1", {"CUDA_VISIBLE_DEVICES": "1"})]
    both_started = threading.Barrier(2, timeout=20)  # breaks (and fails the test) unless two cells overlap
    lock = threading.Lock()
    running: dict[str, str] = {}
    peak = 0

    def run_cell(cell: Cell, slot: Slot) -> dict:
        nonlocal peak
        with lock:
            assert slot.env["CUDA_VISIBLE_DEVICES"] not in running.values(), "two cells on one slot"
            running[cell.id] = slot.env["CUDA_VISIBLE_DEVICES"]
            peak = max(peak, len(running))
        if cell.seed == 0 and cell.precision in ("bf16", "int8"):
            both_started.wait()
        with lock:
            del running[cell.id]
        return {"cell_id": cell.id, "status": "ok", "device": slot.env["CUDA_VISIBLE_DEVICES"]}

    records = scheduler.schedule(CELLS, slots, run_cell)
    assert [r["cell_id"] for r in records] == [c.id for c in CELLS]
    assert peak == 2
    assert {r["device"] for r in records} == {"0", "1"}


def test_a_failed_cell_frees_its_slot_for_the_next_cell():
    order: list[str] = []

    def run_cell(cell: Cell, slot: Slot) -> dict:
        order.append(cell.id)
        return {"cell_id": cell.id, "status": "failed" if cell.precision == "int8" else "ok"}

    finished: list[str] = []
    records = scheduler.schedule(CELLS, [Slot("only")], run_cell, on_finish=lambda cell, record: finished.append(cell.id))
    assert order == finished == [c.id for c in CELLS]
    assert [r["status"] for r in records].count("failed") == 2


def test_a_cell_runner_that_raises_stops_new_cells_and_the_error_surfaces():
    started: list[str] = []

    def run_cell(cell: Cell, slot: Slot) -> dict:
        started.append(cell.id)
        if cell.precision == "int8":
            raise RuntimeError("runner broke")
        return {"cell_id": cell.id, "status": "ok"}

    with pytest.raises(RuntimeError, match="runner broke"):
        scheduler.schedule(CELLS, [Slot("only")], run_cell)
    assert started == ["bf16-seed0", "int8-seed0"]


def test_gpu_lists_become_slots_with_their_own_visible_devices():
    assert scheduler.parse_gpus("0, 1,2,3") == ["0", "1", "2", "3"]
    slots = scheduler.gpu_slots(["0", "1", "2", "3"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    pairs = scheduler.gpu_slots(["0", "1", "2", "3"], per_cell=2)
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"]) for s in pairs] == [("gpu 0+1", "0,1"), ("gpu 2+3", "2,3")]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in scheduler.gpu_slots(scheduler.parse_gpus("0,0"))] == ["0", "0"]
    assert scheduler.parse_gpus("GPU-8f1c2d3e-aaaa-bbbb")[0].startswith("GPU-")
    for bad in ("", "0,,1", "0,x", "cuda:0"):
        with pytest.raises(ValueError, match="--gpus"):
            scheduler.parse_gpus(bad)
    with pytest.raises(ValueError, match="not a multiple"):
        scheduler.gpu_slots(["0", "1", "2"], per_cell=2)
    with pytest.raises(ValueError, match="twice"):
        scheduler.gpu_slots(["0", "0"], per_cell=2)


def test_shards_partition_the_matrix_deterministically():
    cells = [Cell(p, s) for s in (0, 1, 2) for p in ("bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq")]
    for count in (1, 2, 3, 4, 7, 18, 25):
        shards = [scheduler.shard_cells(cells, index, count) for index in range(1, count + 1)]
        flat = [cell for shard in shards for cell in shard]
        assert sorted(flat, key=cells.index) == cells and len(flat) == len(cells)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert shards == [scheduler.shard_cells(cells, index, count) for index in range(1, count + 1)]
    assert scheduler.parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            scheduler.parse_shard(bad)


# --- real cell processes (a fake cell program) through runner.Run and the command line --------


@pytest.fixture(scope="module")
def tsv_suite(tmp_path_factory) -> Path:
    """A suite on a local tiny CLIP folder and real image files (the fake cell never loads them,
    but the suite checks before any cell starts do)."""
    root = tmp_path_factory.mktemp("sched")
    checkpoint = clip.checkpoint(root / "ckpt", image_size=32, patch_size=8, text_positions=32)
    data = clip.images_tsv(root / "data", train_images=6, eval_images=3, size=48, user_format=True)
    text = clip.suite(checkpoint, data, ("bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"), name="sched", steps=2,
                      train="batch_size = 4\nlr = 1e-3\nuntimed_steps = 1", lora=clip.USER_LORA, evaluation=None)
    return write_suite(root, text)


def test_the_fake_cell_speaks_the_protocol():
    from qbench.contract.protocol import EVENT_PREFIX

    assert fake_cell.EVENT_PREFIX == EVENT_PREFIX


def test_each_cell_process_gets_its_own_gpu_and_a_crashed_cell_frees_its_slot(tsv_suite, fake_cells, tmp_path):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "1.0")
    fake_cells.setenv("FAKE_CELL_CRASH", "int8")
    loaded = load(tsv_suite)
    cells = loaded.cells(seeds=(0, 1))[:5]
    listener = RecordingListener()
    slots = scheduler.gpu_slots(["0", "1"])
    run = runner.Run(loaded, tmp_path / "run", "cuda", cells, FakeCells(), listener, slots=slots)
    records = run.execute()

    assert [r["cell_id"] for r in records] == [c.id for c in cells]
    on_disk = {r["cell_id"]: r for r in results.read_records(tmp_path / "run")}
    assert set(on_disk) == {c.id for c in cells}
    crashed = on_disk["int8-seed0"]
    assert crashed["status"] == "failed" and crashed["error_type"] == "ChildProcessDied"
    assert crashed["env.cuda_visible_devices"] in ("0", "1")
    ok = [r for r in on_disk.values() if r["status"] == "ok"]
    assert len(ok) == 4
    assert {r["env.cuda_visible_devices"] for r in ok} == {"0", "1"}  # both GPUs were used
    assert max(r["test.peak_running"] for r in ok) == 2  # two cells ran at the same time ...
    assert all(r["test.peak_running"] <= 2 for r in ok)  # ... never more than the two slots
    assert all(r["test.device_clashes"] is None for r in ok)  # and never two on one GPU
    assert len({r["test.pid"] for r in ok}) == 4  # one process per cell

    # progress stays attributed: each cell starts, reports only its own events, then finishes once
    for cell in cells:
        mine = [entry for entry in listener.log if entry[1] == cell.id]
        assert mine[0][0] == "started" and mine[-1][0] == "finished"
        assert [kind for kind, _, _ in mine].count("finished") == 1
        assert mine[1][2] == {"event": "slot", "slot": f"gpu {on_disk[cell.id]['env.cuda_visible_devices']}"}
        assert all(event.get("cell", cell.id) == cell.id for kind, _, event in mine if kind == "event")


def test_sigterm_stops_every_running_cell_and_starts_no_more(tsv_suite, fake_cells, tmp_path):
    fake_cells.setenv("FAKE_CELL_HOLD_S", "60")
    loaded = load(tsv_suite)
    cells = loaded.cells()[:4]
    run = runner.Run(loaded, tmp_path / "run", "cuda", cells, FakeCells(), slots=scheduler.gpu_slots(["0", "1"]))
    running = tmp_path / "fake" / "running"

    def terminate_when_two_cells_run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if running.is_dir() and len(list(running.iterdir())) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler Run.execute installed turns it into a stop
                return
            time.sleep(0.05)

    threading.Thread(target=terminate_when_two_cells_run, daemon=True).start()
    with pytest.raises(runner.RunInterrupted) as stopped:
        run.execute()
    assert stopped.value.signal_name == "SIGTERM"
    assert "during cell bf16-seed0, int8-seed0" in str(stopped.value)
    on_disk = {r["cell_id"]: r["status"] for r in results.read_records(tmp_path / "run")}
    # the two running cells were stopped (each would otherwise hold for a minute); fp4 and fp4-dq never started
    assert on_disk == {"bf16-seed0": "interrupted", "int8-seed0": "interrupted"}


def test_run_with_gpus_on_the_command_line_writes_every_record_and_the_manifest(tsv_suite, fake_cells, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["run", str(tsv_suite), "--out", str(out), "--gpus", "0,1,2"]) == 0
    (run_dir,) = (out / "sched").iterdir()
    records = results.read_records(run_dir)
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    assert {r["env.device"] for r in records} == {"cuda"}
    assert {r["env.cuda_visible_devices"] for r in records} <= {"0", "1", "2"}
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["gpus"] == ["0", "1", "2"] and manifest["shard"] is None
    assert [s["CUDA_VISIBLE_DEVICES"] for s in manifest["slots"]] == ["0", "1", "2"]
    assert (run_dir / "summary.md").is_file()


@pytest.mark.slow  # two runs and a report (about 25 s)
def test_two_shards_are_exactly_one_full_run_and_merge_into_one_report(tsv_suite, fake_cells, tmp_path):
    out = tmp_path / "out"
    common = ["--seeds", "0,1", "--device", "cpu"]
    assert cli.main(["run", str(tsv_suite), "--out", str(out), *common]) == 0
    (full,) = (out / "sched").iterdir()
    shard_out = tmp_path / "shards"
    assert cli.main(["run", str(tsv_suite), "--out", str(shard_out), *common, "--shard", "1/2"]) == 0
    assert cli.main(["run", str(tsv_suite), "--out", str(shard_out), *common, "--shard", "2/2"]) == 0
    first, second = sorted((shard_out / "sched").iterdir())
    assert first.name.endswith("shard1of2") and second.name.endswith("shard2of2")

    def ids(run_dir: Path) -> list[str]:
        return [r["cell_id"] for r in results.read_records(run_dir)]

    assert not set(ids(first)) & set(ids(second))
    assert sorted(ids(first) + ids(second)) == sorted(ids(full))
    assert len(ids(full)) == 12
    for run_dir, shard in ((first, "1/2"), (second, "2/2")):
        manifest = json.loads((run_dir / "run.json").read_text())
        assert manifest["shard"] == shard and manifest["matrix_cells"] == 12 and len(manifest["cells"]) == 6

    merged = frames.load_frame([first, second])
    assert sorted(merged["cell_id"]) == sorted(ids(full))
    table = tables.precision_table(merged)
    assert sorted(table.index) == sorted(["bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"])
    assert set(table["seeds"]) == {2} and set(table["status"]) == {"ok"}
    assert cli.main(["report", str(first), str(second), "--out", str(tmp_path / "report")]) == 0
    reported = pd.read_csv(tmp_path / "report" / "report.csv")
    assert sorted(reported["cell_id"]) == sorted(ids(full))


def test_bad_gpu_and_shard_options_exit_2_before_any_cell(tsv_suite, fake_cells, tmp_path, capsys):
    out = tmp_path / "out"
    cases = {
        ("--gpus", "0,x"): "'x' is not a GPU index",
        ("--gpus", "0", "--device", "cpu"): "cannot be combined with --device cpu",
        ("--gpus", "0,1", "--gpus-per-cell", "2"): 'model.device_map = "auto"',
        ("--gpus-per-cell", "2"): "--gpus-per-cell needs --gpus",
        ("--shard", "3/2"): "I must be between 1 and N",
    }
    for options, message in cases.items():
        assert cli.main(["run", str(tsv_suite), "--out", str(out), *options]) == 2
        assert message in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert not out.exists()


def test_a_shard_with_no_cells_exits_cleanly(tsv_suite, fake_cells, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(tsv_suite), "--out", str(out), "--only", "bf16", "--shard", "2/3"]) == 0
    assert "has no cells" in capsys.readouterr().out
    assert not out.exists()


class FourGpuNvml:
    """Just enough of pynvml for qbench.cell.measure.nvml.resolve: four GPUs numbered by PCI bus."""

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}{handle}{handle}{handle}-0000"

    def nvmlDeviceGetName(self, handle):
        return f"fake GPU {handle}"


def test_each_cell_measures_the_gpu_its_slot_gave_it(tsv_suite, fake_cells, tmp_path):
    """NVML numbers GPUs by PCI bus, whatever CUDA_VISIBLE_DEVICES says: with the environment each
    cell process really got, its cuda:0 must be its slot's GPU, not GPU 0."""
    from qbench.cell.measure import nvml

    loaded = load(tsv_suite)
    slots = scheduler.gpu_slots(["2", "3"])
    records = runner.Run(loaded, tmp_path / "run", "cuda", loaded.cells()[:4], FakeCells(), slots=slots).execute()
    assert {r["env.cuda_visible_devices"] for r in records} <= {"2", "3"}
    for record in records:
        environ = {"CUDA_VISIBLE_DEVICES": record["env.cuda_visible_devices"], "CUDA_DEVICE_ORDER": record["test.cuda_device_order"]}
        found = nvml.resolve(FourGpuNvml(), 0, environ=environ)
        assert found.index == int(record["env.cuda_visible_devices"]) and found.name == f"fake GPU {found.index}"


def test_resume_with_gpus_runs_the_unfinished_cells_on_the_given_gpus(tsv_suite, fake_cells, tmp_path):
    out = tmp_path / "out"
    fake_cells.setenv("FAKE_CELL_CRASH", "int8,nf4")
    assert cli.main(["run", str(tsv_suite), "--out", str(out), "--gpus", "0,1"]) == 1
    (run_dir,) = (out / "sched").iterdir()
    fake_cells.setenv("FAKE_CELL_CRASH", "")
    assert cli.main(["run", "--resume", str(run_dir), "--gpus", "5,6"]) == 0
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert all(r["status"] == "ok" for r in records.values())
    assert {records[c]["env.cuda_visible_devices"] for c in ("int8-seed0", "nf4-seed0")} <= {"5", "6"}
    assert records["bf16-seed0"]["env.cuda_visible_devices"] in ("0", "1")  # kept from the first run
    assert cli.main(["run", "--resume", str(run_dir), "--shard", "1/2"]) == 2
