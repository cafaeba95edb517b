"""Reports and the gate on a grid: arms are never averaged together, each is compared with its own
baseline arm, compare matches cells by every axis, and the grid's tables and plots appear."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qbench.analysis import stats
from qbench.analysis.gate import compare
from qbench.analysis.report import grid as grid_report
from qbench.analysis.report import summary, tables, write

from .records import make_record, make_records

ADAMW_STATE, EIGHT_BIT_STATE = 1_048_704, 268_288  # bytes after the first step, tiny Llama LoRA r=32 (tests/test_optimizers.py)


def qlora_records(run_id: str = "run-a", seeds=(0,)) -> list[dict]:
    """bf16 + adamw against nf4-dq x three optimizers, as suites/qlora.toml runs them."""
    records = []
    for seed in seeds:
        for precision, optimizer, samples_per_s, state in (
            ("bf16", "adamw", 20.0, ADAMW_STATE), ("nf4-dq", "adamw", 15.0, ADAMW_STATE),
            ("nf4-dq", "adamw8bit", 12.0, EIGHT_BIT_STATE), ("nf4-dq", "paged_adamw8bit", 11.0, EIGHT_BIT_STATE),
        ):
            records.append(make_record(
                precision, seed, run_id, cell_id=f"{precision}-{optimizer}-seed{seed}", config__train__optimizer=optimizer,
                speed__train_samples_per_s=samples_per_s, optimizer__state_bytes=state,
                optimizer__state__uint8_bytes=0 if state == ADAMW_STATE else 262_144,
                optimizer__state__float32_bytes=state if state == ADAMW_STATE else 6_144,
                optimizer__params=32, optimizer__params_with_8bit_state=0 if state == ADAMW_STATE else 32,
                optimizer__paged=False, optimizer__class=f"bnb.{optimizer}",
                optimizer__paged_reason="bitsandbytes pages optimizer state only on CUDA" if "paged" in optimizer else "not paged",
            ))
    return records


def scaling_records(run_id: str = "run-a") -> list[dict]:
    """bf16 / nf4-dq x batch 4, 8 x length 64, 128: memory grows with batch x length, throughput with batch."""
    records = []
    for precision, weights in (("bf16", 500_000_000), ("nf4-dq", 300_000_000)):
        for batch in (4, 8):
            for length in (64, 128):
                records.append(make_record(
                    precision, 0, run_id, cell_id=f"{precision}-bs{batch}-len{length}-seed0", config__train__batch_size=batch,
                    config__train__max_length=length, memory__all_phases__rss_peak_bytes=weights + 1_000_000 * batch * length,
                    speed__train_samples_per_s=(10.0 if precision == "bf16" else 8.0) * batch,
                    speed__train_tokens_per_s=(10.0 if precision == "bf16" else 8.0) * batch * length,
                ))
    return records


def test_a_suite_of_precisions_has_one_arm_per_precision_named_by_it():
    frame = pd.DataFrame(make_records(seeds=(0, 1)))
    assert stats.arms(frame).tolist() == ["bf16", "int8", "nf4-dq"] * 2
    agg = stats.aggregate(frame, ["speed.train_samples_per_s"])
    assert agg.mean.index.name == "precision" and list(agg.mean.index) == ["bf16", "int8", "nf4-dq"]
    assert grid_report.scaling_tables(frame) == {} and grid_report.optimizer_state_table(frame).empty
    assert grid_report.grid_plots(frame) == []


def test_optimizers_are_separate_arms_never_averaged_and_each_is_compared_with_bf16_adamw():
    frame = pd.DataFrame(qlora_records(seeds=(0, 1)))
    agg = stats.aggregate(frame, ["speed.train_samples_per_s"])
    assert agg.mean.index.name == "arm"
    assert agg.mean["speed.train_samples_per_s"].to_dict() == {
        "bf16 adamw": 20.0, "nf4-dq adamw": 15.0, "nf4-dq adamw8bit": 12.0, "nf4-dq paged_adamw8bit": 11.0}
    assert set(agg.count["speed.train_samples_per_s"]) == {2}
    with_ratios = stats.add_speed_ratios(frame)
    ratio = with_ratios.set_index("cell_id")["ratio.speed.train_samples_per_s"]
    assert ratio["nf4-dq-adamw8bit-seed1"] == pytest.approx(12 / 20)  # bf16 ran AdamW only: that is the baseline arm
    relative = stats.relative_to_baseline(frame)
    assert relative.loc["nf4-dq paged_adamw8bit", "baseline arm"] == "bf16 adamw"
    assert relative.loc["nf4-dq paged_adamw8bit", "train samples/s vs bf16 (×)"] == pytest.approx(11 / 20)
    table = tables.precision_table(frame)
    assert list(table.index) == ["bf16 adamw", "nf4-dq adamw", "nf4-dq adamw8bit", "nf4-dq paged_adamw8bit"]
    assert table.loc["nf4-dq adamw8bit", "train samples/s"] == 12.0
    shown = {section.key: section for section in write.report_sections(frame)}
    assert list(shown)[:2] == ["answer", "verdict"]
    # the answer per value of the other axis, each arm against its baseline arm (bf16 ran AdamW only)
    assert "- adamw8bit: nf4-dq stores the base 61 % smaller than bf16 adamw" in shown["answer"].text
    assert "- paged_adamw8bit: nf4-dq stores the base 61 % smaller than bf16 adamw" in shown["answer"].text
    assert shown["answer"].text.count("could not measure peak memory or speed") == 1
    verdict = shown["verdict"]
    assert "**nf4-dq adamw8bit**: weights 61 % smaller than bf16 adamw" in verdict.text
    assert "0.60× bf16 adamw's train samples/s" in verdict.text


def test_each_scaling_point_is_compared_with_the_baseline_at_the_same_batch_size_and_length():
    frame = pd.DataFrame(scaling_records())
    ratios = stats.add_speed_ratios(frame).set_index("cell_id")["ratio.speed.train_samples_per_s"]
    assert ratios.to_dict() == pytest.approx({cell: (1.0 if cell.startswith("bf16") else 0.8) for cell in ratios.index})
    relative = stats.relative_to_baseline(frame)
    assert relative.loc["nf4-dq bs8 len128", "baseline arm"] == "bf16 bs8 len128"
    expected = 100 * (1 - (300_000_000 + 1_024_000_000) / (500_000_000 + 1_024_000_000))
    assert relative.loc["nf4-dq bs8 len128", "peak RSS vs bf16 (% smaller)"] == pytest.approx(expected)
    table = tables.precision_table(frame)
    assert len(table) == 8 and table.index.name == "arm"


def test_the_report_shows_memory_against_batch_size_and_length_per_precision(tmp_path: Path):
    frame = pd.DataFrame(scaling_records())
    shown = grid_report.scaling_tables(frame)
    memory = shown["peak RSS MiB across the grid"]
    assert list(memory.columns) == ["bf16", "nf4-dq"] and list(memory.index) == ["bs4 len64", "bs4 len128", "bs8 len64", "bs8 len128"]
    assert memory.loc["bs8 len128", "nf4-dq"] == pytest.approx((300_000_000 + 1_024_000_000) / 2**20)
    paths = write.write_report(frame, tmp_path / "report")
    assert {"plot:scaling_batch_size", "plot:scaling_max_length"} <= set(paths)
    assert paths["plot:scaling_batch_size"].read_bytes().startswith(b"\x89PNG")
    assert "peak RSS MiB across the grid" in paths["markdown"].read_text()
    assert "plots/scaling_max_length.png" in paths["markdown"].read_text()


def test_the_optimizer_state_table_gives_8bit_state_over_adamw_state(tmp_path: Path):
    frame = pd.DataFrame(qlora_records())
    state = grid_report.optimizer_state_table(frame)
    assert state.loc["nf4-dq adamw8bit", "÷ adamw state"] == pytest.approx(EIGHT_BIT_STATE / ADAMW_STATE)
    assert 0.25 < state.loc["nf4-dq paged_adamw8bit", "÷ adamw state"] < 0.26
    assert state.loc["bf16 adamw", "÷ adamw state"] == 1.0
    assert state.loc["nf4-dq adamw8bit", "params with 8-bit state"] == "32 of 32"
    assert "only on CUDA" in state.loc["nf4-dq paged_adamw8bit", "why not paged"]
    paths = write.write_report(frame, tmp_path / "report")
    assert "plot:optimizer_state" in paths
    assert "Optimizer state after the first step" in (tmp_path / "report" / "report.html").read_text()
    (tmp_path / "run").mkdir()
    written = summary.write_run_outputs(tmp_path / "run", frame)
    assert "÷ adamw state" in written["summary"].read_text()


def checks_of(result: compare.Comparison, verdict: str) -> set[tuple[str, str]]:
    rows = result.checks[result.checks["verdict"] == verdict]
    return set(zip(rows["arm"], rows["metric"], strict=True))


def test_compare_matches_cells_by_every_axis():
    result = compare.compare(pd.DataFrame(qlora_records(seeds=(0, 1))), pd.DataFrame(qlora_records("run-b", seeds=(0, 1))))
    assert result.exit_code == 0, result.markdown()
    assert {arm for arm, _ in checks_of(result, "ok")} == {"bf16 adamw", "nf4-dq adamw", "nf4-dq adamw8bit", "nf4-dq paged_adamw8bit"}
    assert ("nf4-dq adamw8bit", "optimizer.state_bytes") in checks_of(result, "ok")


def test_a_grid_cell_missing_from_the_new_run_is_a_regression_and_names_its_arm():
    new = [r for r in qlora_records("run-b", seeds=(0, 1)) if r["cell_id"] not in ("nf4-dq-adamw8bit-seed0", "nf4-dq-adamw8bit-seed1",
                                                                                  "nf4-dq-paged_adamw8bit-seed1")]
    result = compare.compare(pd.DataFrame(qlora_records(seeds=(0, 1))), pd.DataFrame(new))
    assert result.exit_code == 1
    assert checks_of(result, "missing") == {("nf4-dq adamw8bit", "cells"), ("nf4-dq paged_adamw8bit", "cells")}
    notes = result.regressions.set_index("arm")["note"]
    assert notes["nf4-dq paged_adamw8bit"] == "nf4-dq-paged_adamw8bit-seed1: in the baseline, not in the new results"
    markdown = result.markdown()
    assert "| arm " in markdown and "nf4-dq adamw8bit" in markdown


def test_a_regression_in_one_arm_is_not_hidden_by_the_others():
    new = qlora_records("run-b")
    for record in new:
        if record["config.train.optimizer"] == "adamw8bit":
            record["optimizer.state_bytes"] += 1024
            record["quality.eval_after.mean_recall@1"] -= 0.1
    result = compare.compare(pd.DataFrame(qlora_records()), pd.DataFrame(new))
    assert checks_of(result, "mismatch") == {("nf4-dq adamw8bit", "optimizer.state_bytes")}
    assert checks_of(result, "regression") == {("nf4-dq adamw8bit", "quality.eval_after.mean_recall@1")}


def test_a_setting_that_is_not_an_axis_still_makes_the_input_unusable():
    new = [make_record(p, run_id="run-b", config__lora__r=8) for p in ("bf16", "int8", "nf4-dq")]
    result = compare.compare(pd.DataFrame(make_records()), pd.DataFrame(new))
    assert result.exit_code == 2 and any("config.lora.r differs" in p for p in result.problems)
    # an axis value the baseline has and the new run lacks is a missing cell, not another suite
    baseline = scaling_records()
    new = [r for r in scaling_records("run-b") if r["config.train.batch_size"] == 4]
    result = compare.compare(pd.DataFrame(baseline), pd.DataFrame(new))
    assert result.exit_code == 1
    assert {arm for arm, _ in checks_of(result, "missing")} == {"bf16 bs8 len64", "bf16 bs8 len128", "nf4-dq bs8 len64",
                                                                "nf4-dq bs8 len128"}


def test_arms_stay_named_by_an_axis_value_only_failed_cells_have():
    records = scaling_records()
    for record in records:
        if record["config.train.batch_size"] == 8:  # every bs8 cell ran out of memory
            record.update(status="failed", error="OutOfMemoryError", **{"memory.all_phases.rss_peak_bytes": None})
    frame = pd.DataFrame(records)
    means = tables.ok_means(frame)
    assert list(means.index) == ["bf16 bs4 len64", "bf16 bs4 len128", "nf4-dq bs4 len64", "nf4-dq bs4 len128"]
    table = tables.precision_table(frame)
    assert table.loc["nf4-dq bs4 len128", "peak memory (MiB, RSS)"] == pytest.approx((300_000_000 + 512_000_000) / 2**20)
    assert table.loc["nf4-dq bs8 len128", "status"] == "failed"
    assert tables.failures(frame)["cell_id"].str.contains("bs8").all()


def test_the_terminal_shows_a_grid_of_many_arms_as_rows_split_into_tables_that_fit(tmp_path: Path, monkeypatch):
    import io

    from rich.console import Console

    from qbench import cli
    from qbench.cli import render

    from .records import write_run

    run_dir = write_run(tmp_path / "run", scaling_records())
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(render, "console", Console(file=io.StringIO(), width=80))
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    out = render.console.file.getvalue()
    per_precision = out[out.index("Per precision"):out.index("Quality, every metric")]
    rows = [line for line in per_precision.splitlines() if line.startswith("│ nf4-dq bs8 len128")]
    assert len(rows) >= 2, out  # one row per arm in each of the tables the columns were split into
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    for column in ("status", "peak memory (MiB, RSS)", "train samples/s", "final train loss"):  # nothing left out
        assert all(word in per_precision for word in column.split()), column
