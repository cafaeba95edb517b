"""LLM.int8's outlier threshold is a setting of the int8 arm (quantization.llm_int8_threshold) and an axis of the
grid (matrix.llm_int8_threshold): it reaches bitsandbytes, the record, the arms of a report and `qbench compare`."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.contract.suite import LoadedSuite, SuiteError, parse

from .helpers import suites

SUITE = suites.causal_lm(
    precisions=("dense", "int8"), name="int8thr", settings='compute_dtype = "float32"\nbaseline = "dense"\nthreads = 1',
    steps=0, train="batch_size = 4\nlr = 5e-3\nmax_length = 64\nuntimed_steps = 0",
    lora='r = 8\nalpha = 16\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]',
    evaluation="batch_size = 16\nwindow = 64\nmax_windows = 16",
)


def loaded(text: str) -> LoadedSuite:
    return LoadedSuite(parse(text, "s.toml"), Path("s.toml"), "0" * 64, text)


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def test_the_threshold_is_a_setting_of_the_int8_arm():
    suite = loaded(SUITE + "[quantization]\nllm_int8_threshold = 4.5\n")
    dense, int8 = suite.cells()
    assert (dense.id, int8.id) == ("dense-seed0", "int8-seed0")
    assert suite.for_cell(int8).suite.quantization.llm_int8_threshold == 4.5
    assert int8.record_fields()["precision.llm_int8_threshold"] == 4.5
    assert dense.record_fields()["precision.llm_int8_threshold"] is None


def test_an_axis_of_thresholds_makes_int8_arms_and_leaves_the_others_alone():
    text = SUITE.replace('precisions = ["dense", "int8"]', 'precisions = ["dense", "int8", "nf4"]\nllm_int8_threshold = [6.0, 0]')
    suite = loaded(text)
    assert [c.id for c in suite.cells()] == ["dense-seed0", "int8-t6-seed0", "int8-t0-seed0", "nf4-seed0"]
    assert [suite.for_cell(c).suite.quantization.llm_int8_threshold for c in suite.cells()[1:3]] == [6.0, 0.0]
    assert [c.id for c in suite.cells(where={"llm_int8_threshold": (0.0,)})] == ["int8-t0-seed0"]
    excluded = loaded(text.replace("llm_int8_threshold = [6.0, 0]", "llm_int8_threshold = [6.0, 0]\nexclude = [{llm_int8_threshold = 0}]"))
    assert [c.id for c in excluded.cells()] == ["dense-seed0", "int8-t6-seed0", "nf4-seed0"]


def test_a_threshold_without_an_int8_arm_or_in_the_wrong_place_is_refused_with_where_it_goes():
    without = SUITE.replace('"dense", "int8"', '"dense"')
    assert problems_of(without + "[quantization]\nllm_int8_threshold = 0.0\n") == [
        "quantization.llm_int8_threshold: LLM.int8's outlier threshold is a setting of int8 arms, and matrix.precisions "
        "has none (dense); add int8 or leave the key out"]
    assert any(p.startswith("matrix.llm_int8_threshold: LLM.int8's outlier threshold is a setting of int8 arms")
               for p in problems_of(without + "llm_int8_threshold = [1.0]\n"))
    assert problems_of(SUITE.replace("threads = 1", "threads = 1\nllm_int8_threshold = 0.0")) == [
        "llm_int8_threshold: unknown key (did you mean 'quantization.llm_int8_threshold'?)"]
    (line,) = problems_of(SUITE.replace('"dense", "int8"]', '"dense", "int8", "int8-t0"]'))
    assert "quantization.llm_int8_threshold" in line and "'int8-t0'" in line
    assert problems_of(SUITE + "[quantization]\nllm_int8_threshold = -1.0\n")[0].startswith("quantization.llm_int8_threshold:")


@pytest.mark.slow
def test_two_thresholds_run_as_two_int8_arms_recorded_and_compared(tmp_path):
    """The handed case (int8-outlier-threshold-not-settable): 6.0 and 0.0 side by side. Each int8 cell's linears hold
    the threshold it names (read back from bitsandbytes), the records say it, and the arms are told apart by the
    report's tables and by compare, which refuses a baseline made with another threshold."""
    from qbench import cli
    from qbench.analysis import load, stats
    from qbench.analysis.gate import compare
    from qbench.contract import records

    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.replace('precisions = ["dense", "int8"]', 'precisions = ["dense", "int8"]\nllm_int8_threshold = [6.0, 0.0]'))
    assert cli.main(["run", str(suite), "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = (tmp_path / "out" / "int8thr").iterdir()
    found = {r["cell_id"]: r for r in records.read_records(run_dir)}
    assert sorted(found) == ["dense-seed0", "int8-t0-seed0", "int8-t6-seed0"]
    assert found["int8-t6-seed0"]["precision.llm_int8_threshold"] == 6.0 and found["int8-t6-seed0"]["weights.load.linears.int8_thresholds"] == "6.0"
    assert found["int8-t0-seed0"]["precision.llm_int8_threshold"] == 0.0 and found["int8-t0-seed0"]["weights.load.linears.int8_thresholds"] == "0.0"
    assert found["dense-seed0"]["precision.llm_int8_threshold"] is None
    perplexity = {cell: r["quality.eval_before.perplexity"] for cell, r in found.items()}
    assert perplexity["int8-t0-seed0"] != perplexity["int8-t6-seed0"]  # outlier columns in 16-bit or not: other sums

    frame = load.load_results([run_dir])
    assert stats.arm_order(frame) == ["dense", "int8 t0", "int8 t6"]
    assert set(stats.baseline_arms(frame).dropna()) == {"dense"}
    same = compare.compare(frame, frame)
    assert not same.problems and set(same.checks["arm"]) == {"dense", "int8 t6", "int8 t0"}

    other = tmp_path / "other.toml"
    other.write_text(SUITE + "[quantization]\nllm_int8_threshold = 4.5\n")
    assert cli.main(["run", str(other), "--device", "cpu", "--out", str(tmp_path / "other"), "--only", "int8"]) == 0
    (other_dir,) = (tmp_path / "other" / "int8thr").iterdir()
    only_t6 = frame[frame["cell_id"] != "int8-t0-seed0"]
    refused = compare.compare(only_t6, load.load_results([other_dir]))
    assert any(p.startswith("precision.llm_int8_threshold differs: baseline 6 vs new 4.5") for p in refused.problems)
