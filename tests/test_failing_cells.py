"""A failing cell is recorded with its status, error and what it had measured; the suite goes on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qbench import cli
from qbench.cell import pipeline as cell
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec
from qbench.contract.suite import load

from .conftest import write_suite
from .helpers import clip, faults
from .helpers.faulty_cell import planted


def test_fault_specs_parse_and_bad_ones_are_refused():
    parsed = faults.parse("nf4-seed0:train:nan:2, *:load:unsupported")
    assert parsed == [faults.Fault("nf4-seed0", "train", "nan", 2.0), faults.Fault("*", "load", "unsupported")]
    injector = faults.Injector("bf16-seed0", {faults.ENV_VAR: "nf4-seed0:train:nan:2,*:load:oom"})
    assert injector.describe() == "*:load:oom"
    for bad in ("nf4-seed0:train", "x:warmup:oom", "x:train:melt", "x:load:nan"):
        with pytest.raises(ValueError, match=faults.ENV_VAR):
            faults.parse(bad)


def test_without_the_variable_nothing_is_injected():
    injector = faults.Injector("bf16-seed0", {})
    assert injector.faults == [] and injector.describe() is None
    loss = object()
    assert injector.wrap_loss(loss) is loss


def run_in_process(tmp_path: Path, model: Path, data: Path, monkeypatch, fault: str) -> dict:
    """One bf16 cell, run in this process with QBENCH_TEST_FAULTS=fault planted (tests/helpers/faulty_cell.py)."""
    suite = write_suite(tmp_path, clip.suite(model, data, precisions=("bf16",), steps=3, name="robust"))
    loaded = load(suite)
    record_path = tmp_path / "cells" / "bf16-seed0.json"
    monkeypatch.setenv(faults.ENV_VAR, fault)
    spec = CellSpec(
        suite_text=loaded.text, suite_path=str(loaded.path), suite_sha256=loaded.sha256, run_id="test",
        cell_id="bf16-seed0", precision="bf16", seed=0, device="cpu", record_path=str(record_path),
    )
    with planted():
        record = cell.run_cell(spec)
    assert results.read_record(record_path) == record  # what is returned is what is on disk
    assert record["config.safetensors_only"] is True and record["config.trust_remote_code"] is False
    assert record["test.injected_faults"] == fault
    return record


def test_a_nan_loss_fails_the_cell_and_keeps_what_was_measured(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch):
    record = run_in_process(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch, "bf16-seed0:train:nan:2")
    assert record["status"] == "failed" and record["error_type"] == "NonFiniteLoss"
    assert record["error"] == "NonFiniteLoss: training loss is nan at step 2"
    assert record["error_phase"] == "train" and record["train.steps_completed"] == 1
    # the loss of the last step run (step 1; step 2 was NaN): the same as the first
    assert math.isfinite(record["train.first_loss"]) and record["train.final_loss"] == record["train.first_loss"]
    clip.assert_recall_is_an_exact_share(record, "eval_before")
    assert "quality.eval_after.mean_recall@1" not in record
    assert record["time.load.wall_s"] > 0 and record["weights.load.base_bytes"] > 0
    assert record["memory.train.rss_peak_bytes"] > 0 and record["speed.timed_steps"] == 0


def test_out_of_memory_is_recorded_as_failed_with_its_type(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch):
    record = run_in_process(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch, "*:train:oom:3")
    assert record["status"] == "failed" and record["error_type"] == "OutOfMemoryError"
    assert record["train.steps_completed"] == 2 and record["speed.timed_steps"] == 1
    assert "Traceback" in record["error_traceback"] and "OutOfMemoryError" in record["error_traceback"]


def test_a_format_the_device_cannot_run_is_unsupported(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch):
    record = run_in_process(tmp_path, tiny_clip_dir, tsv_data_dir, monkeypatch, "bf16-seed0:load:unsupported")
    assert record["status"] == "unsupported" and record["error_type"] == "NotImplementedError"
    assert record["error_phase"] == "load"
    assert record["data.train_images"] == 24 and "time.load.wall_s" not in record
    assert record["memory.data.rss_peak_bytes"] > 0


def test_a_killed_cell_process_is_recorded_and_the_other_cells_still_finish(tmp_path, tiny_clip_dir, tsv_data_dir, faulty_cells, capsys):
    suite = write_suite(tmp_path, clip.suite(tiny_clip_dir, tsv_data_dir, precisions=("bf16", "nf4"), steps=3, name="robust"))
    faulty_cells("bf16-seed0:train:sigkill:2")
    code = cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 1
    (run_dir,) = (tmp_path / "out" / "robust").iterdir()
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    killed, survivor = records["bf16-seed0"], records["nf4-seed0"]
    assert survivor["status"] == "ok", survivor.get("error")
    assert killed["status"] == "failed" and killed["error_type"] == "ChildProcessDied"
    assert killed["error"].startswith("cell process was killed by signal SIGKILL (last phase: train)")
    assert killed["error_returncode"] == -9
    # what the cell had measured before it died survives from its last checkpoint
    clip.assert_recall_is_an_exact_share(killed, "eval_before")
    assert killed["time.load.wall_s"] > 0
    assert killed["weights.load.base_bytes"] > 0 and killed["config.safetensors_only"] is True
    summary = (run_dir / "summary.md").read_text()
    assert "Cells that did not finish" in summary and "bf16-seed0" in summary and "SIGKILL" in summary
    err = capsys.readouterr().err
    assert "1 cell(s) did not finish: bf16-seed0 (failed: ChildProcessDied)" in err
