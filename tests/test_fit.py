"""qbench fit: sizes, the budget's verdict, the tensor-byte counter, the estimate's exact parts, the search's answer
and trial bound, bad input (exit 2, one line, nothing run), and the acceptance check end to end: the value found
fits as an ordinary `qbench run` cell and the next one does not."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from qbench.contract import sizes
from qbench.runner import fit
from qbench.runner.estimate import ArmModel, Curve

from .conftest import SUITES, write_suite

# -- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * 10**9), ("12 GiB", 12 * 2**30), ("800MiB", 800 * 2**20), ("1.5kB", 1500), ("20.9MB", 20_900_000),
    ("12gib", 12 * 2**30), ("4096B", 4096), (123, 123),
])
def test_sizes_people_write_are_bytes(text, expected):
    assert sizes.parse_size(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("12", "no unit"), ("12G", "could mean GB"), ("twelve", "not a size"), ("12 XB", "unknown unit"),
    ("0MiB", "at least one byte"), ("-5MB", "not a size"), (0, "positive"), (True, "not a size"),
])
def test_what_is_not_a_size_is_refused_with_why(text, says):
    with pytest.raises(sizes.SizeError, match=says):
        sizes.parse_size(text)


# -- the verdict a cell records ------------------------------------------------------------------------------------


def _suite(budget="1MiB", margin=0.0):
    from qbench.contract.suite import parse

    text = (SUITES / "fit-llm.toml").read_text().replace('budget = "20.9MB"', f'budget = "{budget}"').replace(
        "margin = 0.0", f"margin = {margin}")
    return parse(text)


@pytest.mark.parametrize(("record", "within", "reason"), [
    ({"status": "ok", "memory.all_phases.torch_cpu_increase_peak_bytes": 2**20}, True, None),
    ({"status": "ok", "memory.all_phases.torch_cpu_increase_peak_bytes": 2**20 + 1}, False, None),
    ({"status": "failed", "error_type": "OutOfMemoryError", "error_phase": "train"}, False, "ran out of memory"),
    ({"status": "failed", "error_type": "NonFiniteLoss"}, None, "did not finish"),
    ({"status": "ok", "memory.all_phases.torch_cpu_increase_peak_bytes": None}, None, "not measured"),
])
def test_a_cell_records_whether_its_peak_is_within_the_budget(record, within, reason):
    from qbench.cell import budget

    found = budget.verdict(record, _suite(), "cpu")
    assert found["fit.within_budget"] is within
    assert found["fit.budget_bytes"] == found["fit.limit_bytes"] == 2**20
    assert (reason is None and "fit.verdict_reason" not in found) or reason in found["fit.verdict_reason"]


def test_the_margin_lowers_the_limit_the_peak_is_judged_against():
    from qbench.cell import budget

    found = budget.verdict({"status": "ok", "memory.all_phases.torch_cpu_increase_peak_bytes": 950_000}, _suite("1MB", 0.1), "cpu")
    assert found["fit.limit_bytes"] == 900_000
    assert found["fit.within_budget"] is False


# -- the tensor-byte counter ---------------------------------------------------------------------------------------


def test_the_counter_sees_every_tensor_byte_and_its_peak():
    import torch

    from qbench.cell.measure.tensor_bytes import CpuTensorBytes

    counter = CpuTensorBytes()
    counter.start()
    kept = torch.empty(1024, dtype=torch.float32)  # 4096 bytes
    brief = torch.empty(2048, dtype=torch.float64)  # 16384 bytes, freed before the flush
    del brief
    assert counter.flush() == 4096 + 16384
    assert counter.current == 4096
    also = torch.empty(10, dtype=torch.int8)
    del kept
    assert counter.flush() == 4096 + 10
    counter.stop()
    assert counter.current == 10
    del also


# -- the estimate's exact part ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["dense", "nf4-dq", "nf4", "fp4", "int8"])
def test_the_estimate_counts_the_base_to_the_byte(precision, tiny_llama_path):
    """The base's bytes counted from the model's shapes equal those of the base loaded and quantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qbench.cell import estimate, models
    from qbench.cell.measure.weights import account_base
    from qbench.contract import precisions
    from qbench.contract.suite import ModelSpec

    chosen = precisions.get(precision)
    loaded = models.load_base(AutoModelForCausalLM, tiny_llama_path, chosen, "bfloat16", "cpu",
                              ModelSpec(id="builtin:tiny-llama"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_path), dtype=torch.bfloat16)
    assert estimate.base_bytes(meta, chosen, "bfloat16")["bytes"] == account_base(loaded)["weights.load.base_bytes"]


# -- the search --------------------------------------------------------------------------------------------------------

STATIC = 1_000_000
PER_VALUE = 10_000


def _model(scale: float) -> ArmModel:
    """A model whose activation curve is `scale` times the truth (the truth: PER_VALUE bytes per value)."""
    return ArmModel(base_bytes=STATIC, adapter_bytes=0, optimizer_bytes=0, load_bytes=0,
                    train=Curve([1, 1000], [scale * PER_VALUE, scale * PER_VALUE * 1000]), eval=None, evaluates=False)


def _search(low: int, high: int, threshold: int, scale: float, capped: bool = False) -> fit.Search:
    """A search whose truth is: value v peaks at STATIC + v * PER_VALUE; the limit lets up to `threshold` fit.
    `capped`: a value over the limit runs out of memory and measures nothing (a capped GPU)."""
    limit = STATIC + threshold * PER_VALUE
    search = fit.Search("dense", "dense", "batch_size", low, high, fit.bound(low, high), {"precision": "dense", "seed": 0})

    def run_trial(settings, name):
        peak = STATIC + settings["batch_size"] * PER_VALUE
        if capped and peak > limit:
            return {"status": "failed", "error_type": "OutOfMemoryError", "fit.peak_bytes": None, "fit.within_budget": False}
        return {"status": "ok", "fit.peak_bytes": peak, "fit.within_budget": peak <= limit,
                "memory.train.torch_cpu_increase_peak_bytes": peak}

    return fit.search_arm(search, _model(scale), limit, limit, run_trial, "torch_cpu_increase_peak_bytes", fit.QuietListener())


@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.9, 1.1, 0.3, 3.0, 0.01, 100.0])
@pytest.mark.parametrize(("low", "high"), [(1, 128), (2, 1000), (16, 17), (5, 5), (1, 65536)])
def test_the_search_finds_the_largest_fitting_value_within_its_trial_bound(scale, low, high, capped):
    """Whatever the estimate's error, and whether a value over the limit measures or runs out of memory, the
    answer is exact and the trials are at most ceil(log2(range)) + 3."""
    for threshold in sorted({low - 1, low, (low + high) // 2, high - 1, high, high + 5, low + 1}):
        search = _search(low, high, threshold, scale, capped)
        assert len(search.trials) <= search.max_trials == (math.ceil(math.log2(high - low)) + 3 if high > low else 1)
        if threshold < low:
            assert (search.outcome, search.largest) == ("none fit", None)
        elif threshold >= high:
            assert (search.outcome, search.largest) == ("all fit", high)
        else:
            assert (search.outcome, search.largest, search.smallest_over) == ("found", threshold, threshold + 1)


def test_a_good_estimate_answers_in_two_trials():
    search = _search(1, 65536, 777, 1.0)
    assert [t.value for t in search.trials] == [777, 778]
    assert [t.how for t in search.trials] == ["estimate", "estimate"]


@pytest.mark.parametrize("threshold", [0, 1, 37, 500, 65535, 70000])
def test_without_an_estimate_the_trials_alone_find_the_answer_within_the_bound(threshold):
    """When the meta-device run cannot trace the model, the search starts knowing nothing and still answers."""
    arm = fit.Arm("dense", {"precision": "dense", "seed": 0, "optimizer": "adamw"})
    model = fit.curve_models({"unavailable": "a model the meta device cannot run"}, "batch_size", arm)
    limit = STATIC + threshold * PER_VALUE
    search = fit.Search("dense", "dense", "batch_size", 1, 65536, fit.bound(1, 65536), {"precision": "dense", "seed": 0})

    def run_trial(settings, name):
        peak = STATIC + settings["batch_size"] * PER_VALUE
        return {"status": "ok", "fit.peak_bytes": peak, "fit.within_budget": peak <= limit,
                "memory.train.torch_cpu_increase_peak_bytes": peak, "memory.prepare.torch_cpu_increase_peak_bytes": STATIC}

    fit.search_arm(search, model, limit, limit, run_trial, "torch_cpu_increase_peak_bytes", fit.QuietListener())
    assert len(search.trials) <= search.max_trials
    assert search.largest == (None if threshold < 1 else min(threshold, 65536))


def test_after_out_of_memory_trials_the_steps_double():
    """An estimate 100 times too low, on a capped GPU: the first trial runs out of memory, and so may the next
    ones; the steps back from it double (1, 2, 4, ...) until one fits."""
    search = _search(1, 65536, 500, 0.01, capped=True)
    steps = [t.value for t in search.trials]
    assert search.largest == 500 and len(steps) <= search.max_trials
    assert search.trials[1].how == "exponential" and steps[0] - steps[1] == 1 and steps[1] - steps[2] == 2


def test_an_arm_whose_base_alone_is_over_the_limit_is_refused_without_a_trial():
    search = fit.Search("dense", "dense", "batch_size", 1, 64, fit.bound(1, 64), {"precision": "dense", "seed": 0})
    ran = []
    fit.search_arm(search, _model(1.0), STATIC - 1, STATIC - 1, lambda s, n: ran.append(s), "x", fit.QuietListener())
    assert (search.outcome, ran) == ("refused", [])
    assert "the base alone needs" in search.reason


# -- bad input: exit 2, one line, before any trial ---------------------------------------------------------------------


def _fit(tmp_path, *args, suite=SUITES / "fit-llm.toml"):
    from qbench.cli import main

    out = tmp_path / "out"
    code = main(["fit", str(suite), "--out", str(out), "--no-quality", *args])
    return code, out


@pytest.mark.parametrize(("args", "says"), [
    (["--budget", "12 G"], "could mean GB"),
    (["--budget", "lots"], "not a size"),
    (["--budget", "12"], "no unit"),
    (["--axis", "window"], "not a setting fit can search for task causal_lm"),
    (["--margin", "0.7"], "--margin"),
])
def test_bad_command_lines_exit_2_with_one_line_and_run_nothing(tmp_path, capsys, args, says):
    code, out = _fit(tmp_path, *args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("error: command line:")
    assert not out.exists()


@pytest.mark.parametrize(("changes", "says"), [
    ([('axes = ["max_length"]', "axes = []"), ("max_length = [16, 128]", "")], "fit.axes: the suite names no axis"),
    ([('axes = ["max_length"]', 'axes = ["max_length", "lora_r"]')], "fit.axes: 'lora_r': not a setting fit searches"),
    ([('budget = "20.9MB"\n', "")], "fit.budget: no budget"),
    ([('budget = "20.9MB"', 'budget = "20.9 megabytes"')], "fit.budget: '20.9 megabytes': unknown unit"),
    ([('precisions = ["dense", "nf4-dq"]', 'precisions = ["dense", "nf4-dq"]\nmax_length = [32, 64]')], "matrix.max_length"),
    ([("max_length = [16, 128]", "max_length = [16, 512]")], "takes at most 128"),
])
def test_a_suite_that_cannot_be_searched_exits_2_with_one_line(tmp_path, capsys, changes, says):
    text = (SUITES / "fit-llm.toml").read_text()
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    suite = write_suite(tmp_path, text)
    code, out = _fit(tmp_path, suite=suite)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and says in lines[0], lines
    assert not out.exists()


def test_a_budget_below_the_base_alone_exits_2_before_any_trial(tmp_path, capsys):
    code, out = _fit(tmp_path, "--budget", "500KiB")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and "below what the base alone" in lines[0] and "nf4-dq" in lines[0]
    assert not out.exists()


# -- the acceptance check, end to end -------------------------------------------------------------------------------


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["config.train.max_length"]: r for r in (json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json"))}


@pytest.mark.slow
def test_the_value_found_fits_as_a_qbench_run_cell_and_the_next_does_not(tmp_path, capsys):
    """fit-llm over a narrowed range: dense and nf4-dq answers differ; each answer fits as an ordinary `qbench run`
    cell and the value above it does not; every trial's estimate is within 15 % of its measurement."""
    from qbench.cli import main

    text = (SUITES / "fit-llm.toml").read_text().replace("max_length = [16, 128]", "max_length = [90, 120]")
    suite = write_suite(tmp_path, text)
    code, out = _fit(tmp_path, suite=suite)
    assert code == 0, capsys.readouterr().err
    result = json.loads(next((out / "fit-llm").glob("fit-*/fit.json")).read_text())
    answers = {s["precision"]: s for s in result["searches"]}
    assert {s["outcome"] for s in answers.values()} == {"found"}
    assert answers["dense"]["largest"] < answers["nf4-dq"]["largest"]
    for search in answers.values():
        assert len(search["trials"]) <= search["max_trials"] == math.ceil(math.log2(120 - 90)) + 3
        assert all(abs(t["error"]) <= 0.15 for t in search["trials"])
    raw = tomllib.loads(text)
    for precision, search in answers.items():
        found = search["largest"]
        check = write_suite(tmp_path, text.replace('precisions = ["dense", "nf4-dq"]',
                                                   f'precisions = ["dense", "nf4-dq"]\nmax_length = [{found}, {found + 1}]'),
                            f"check-{precision}.toml")
        assert main(["run", str(check), "--out", str(tmp_path / "runs"), "--only", precision]) == 0
        run_dir = max((tmp_path / "runs" / raw["name"]).glob("2*"), key=lambda p: p.stat().st_mtime)
        records = _records(run_dir)
        assert records[found]["fit.within_budget"] is True
        assert records[found + 1]["fit.within_budget"] is False
        trial = next(t for t in search["trials"] if t["value"] == found)
        assert records[found]["fit.peak_bytes"] == pytest.approx(trial["measured"], abs=4096)
