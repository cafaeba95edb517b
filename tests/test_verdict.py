"""The verdict and the noise: one line per precision in words, intervals on every quality figure, no claim (word or
Pareto highlight) inside the noise, and the figures this device cannot measure meaningfully said to be so."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis import stats
from qbench.analysis.report import eval_checks, tables, verdict, write

from .records import make_record, make_records, write_run

MiB = 1024 * 1024
Z95 = 1.959963984540054


def with_interval(record: dict, se: float, column: str = "quality.eval_after.mean_recall@1") -> dict:
    """The record with the bootstrap interval helper "truth" writes for `column`: se, and a 95 % low / high."""
    value = record[column]
    name = column.removeprefix("quality.")
    record.update({
        f"interval.{name}.se": se, f"interval.{name}.low": value - Z95 * se, f"interval.{name}.high": value + Z95 * se,
        "interval.method": "bootstrap over eval queries", "interval.resamples": 1000, "interval.confidence": 0.95,
    })
    return record


def cpu_records(se: float | None = 0.04, recalls=(0.60, 0.59, 0.57), runtime_mib: int = 400, pss: bool = False) -> list[dict]:
    """bf16, int8, nf4-dq on a CPU whose process held `runtime_mib` before the model was loaded."""
    records = []
    for precision, recall in zip(("bf16", "int8", "nf4-dq"), recalls, strict=True):
        record = make_record(precision)
        record["quality.eval_after.mean_recall@1"] = recall
        record["memory.process_baseline.rss_bytes"] = runtime_mib * MiB
        if pss:
            record["memory.all_phases.pss_peak_bytes"] = record["memory.all_phases.rss_peak_bytes"] - 100 * MiB
            record["memory.process_baseline.pss_bytes"] = (runtime_mib - 100) * MiB
        records.append(with_interval(record, se) if se is not None else record)
    return records


def line_of(result: verdict.Verdict, precision: str) -> verdict.Line:
    return next(line for line in result.lines if line.precision == precision)


# ---- intervals: the eval set's bootstrap and the seeds' spread ----

def test_one_cell_keeps_its_own_bootstrap_interval():
    record = make_record("bf16")
    record.update({"interval.eval_after.mean_recall@1.low": 0.50, "interval.eval_after.mean_recall@1.high": 0.66,
                   "interval.eval_after.mean_recall@1.se": 0.04})
    row = stats.quality_intervals(pd.DataFrame([record]), "quality.eval_after.mean_recall@1").loc["bf16"]
    assert (row["low"], row["high"], row["se"], row["source"]) == (0.50, 0.66, 0.04, "bootstrap")


def test_the_seeds_spread_adds_to_the_eval_sets_sampling_error():
    records = [with_interval(make_record("bf16", seed=s), 0.02) for s, r in ((0, 0.5), (1, 0.6))]
    for record, recall in zip(records, (0.5, 0.6), strict=True):
        record["quality.eval_after.mean_recall@1"] = recall
    row = stats.quality_intervals(pd.DataFrame(records), "quality.eval_after.mean_recall@1").loc["bf16"]
    seeds_se = pd.Series([0.5, 0.6]).std() / math.sqrt(2)
    assert row["se"] == pytest.approx(math.sqrt(0.02**2 + seeds_se**2))
    assert row["high"] == pytest.approx(0.55 + Z95 * row["se"])
    assert row["source"] == "bootstrap + seeds"


def test_no_noise_in_the_records_gives_no_interval():
    row = stats.quality_intervals(pd.DataFrame(make_records()), "quality.eval_after.mean_recall@1").loc["nf4-dq"]
    assert math.isnan(row["se"]) and math.isnan(row["low"]) and row["source"] is None


# ---- words from the intervals ----

def test_a_difference_inside_the_noise_is_the_same_within_noise_not_worse():
    frame = pd.DataFrame(cpu_records(se=0.04))  # 3 points apart, 95 % noise of the difference ±11 points
    compared = stats.compare_quality(frame, "quality.eval_after.mean_recall@1").table
    assert compared.loc["nf4-dq", "verdict"] == "no difference the eval can detect"
    assert compared.loc["nf4-dq", "delta_low"] == pytest.approx(-0.03 - Z95 * math.sqrt(2) * 0.04)
    assert stats.relative_to_baseline(frame).loc["nf4-dq", "quality vs bf16"] == "no difference the eval can detect"
    text = line_of(verdict.verdict(frame), "nf4-dq").sentence()
    assert "mean recall@1 after fine-tuning 57.00 % (-3.00 points vs bf16 [-14.09, +8.09]: no difference the eval can detect)" in text
    assert "worse" not in text


def test_a_difference_beyond_the_noise_is_called_worse():
    frame = pd.DataFrame(cpu_records(se=0.005))  # 95 % noise of the difference ±1.4 points
    assert stats.compare_quality(frame, "quality.eval_after.mean_recall@1").table.loc["nf4-dq", "verdict"] == "worse"
    assert stats.compare_quality(frame, "quality.eval_after.mean_recall@1").table.loc["int8", "verdict"] == "no difference the eval can detect"


def test_a_lower_is_better_metric_is_better_when_it_falls_beyond_the_noise():
    records = []
    for precision, ppl in (("bf16", 10.0), ("nf4-dq", 9.0)):
        record = make_record(precision)
        record["quality.eval_after.perplexity"] = ppl
        record.update({"interval.eval_after.perplexity.se": 0.1, "interval.eval_after.perplexity.low": ppl - 0.2,
                       "interval.eval_after.perplexity.high": ppl + 0.2})
        records.append(record)
    compared = stats.compare_quality(pd.DataFrame(records), "quality.eval_after.perplexity").table
    assert compared.loc["nf4-dq", "verdict"] == "better"


def test_the_pareto_front_does_not_single_out_a_difference_inside_the_noise():
    cost = pd.Series({"nf4": 1.0, "int8": 2.0, "bf16": 3.0})
    quality = pd.Series({"nf4": 0.50, "int8": 0.52, "bf16": 0.70})
    # without noise int8 is on the front for 2 points more; with a 3-point standard error it is not
    assert stats.pareto_front(cost, quality, True).to_dict() == {"nf4": True, "int8": True, "bf16": True}
    noisy = stats.pareto_front(cost, quality, True, se=pd.Series(0.03, index=cost.index))
    assert noisy.to_dict() == {"nf4": True, "int8": False, "bf16": True}  # bf16's 20 points are beyond the noise


# ---- what this device measures meaningfully ----

def test_a_cpu_verdict_says_memory_and_speed_are_not_meaningful_here_and_where_to_measure_them():
    result = verdict.verdict(pd.DataFrame(cpu_records(runtime_mib=400)))
    nf4 = line_of(result, "nf4-dq")
    assert nf4.not_meaningful == ["peak memory", "speed"]
    assert nf4.sentence().startswith("nf4-dq: weights 61 % smaller than bf16 (0.17 MiB vs 0.42 MiB); peak memory ")
    assert "train samples/s" in nf4.sentence() and "0.75× bf16's" in nf4.sentence()
    notes = "\n".join(result.notes)
    assert "400 MiB of bf16's 553 MiB peak (72%) was held before the model was loaded" in notes
    assert "--device cuda" in notes and "Measure speed on the GPU you will train on" in notes
    assert "baseline" in line_of(result, "bf16").sentence()


def test_on_a_cpu_the_process_tree_pss_is_the_memory_figure_when_the_records_have_it():
    result = verdict.verdict(pd.DataFrame(cpu_records(pss=True)))
    text = line_of(result, "int8").sentence()
    assert "(PSS: 558 MiB vs 453 MiB" in text and "23 % larger than bf16" in text
    # the increase over the process baseline: 258 vs 153 MiB
    assert "above what the process held before the model was loaded: 69 % larger" in text
    table = tables.precision_table(pd.DataFrame(cpu_records(pss=True)))
    assert table.loc["int8", "peak memory (MiB, PSS)"] == pytest.approx(690e6 / MiB - 100)
    assert table.loc["int8", "before model load (MiB)"] == pytest.approx(300)


def test_a_gpu_verdict_measures_memory_with_torch_and_calls_speed_meaningful():
    records = []
    for record in cpu_records():
        record.update({"env.device": "cuda:0", "memory.train.torch_allocated_peak_bytes": record["weights.load.base_bytes"] + 50 * MiB,
                       "memory.process_baseline.torch_allocated_bytes": 0})
        records.append(record)
    result = verdict.verdict(pd.DataFrame(records))
    nf4 = line_of(result, "nf4-dq")
    assert nf4.not_meaningful == []
    assert "torch allocated, train" in nf4.sentence()
    assert not result.notes


def test_a_contended_cell_makes_its_speed_not_meaningful():
    records = [dict(r, **{"env.device": "cuda:0"}) for r in cpu_records()]
    records[2]["speed.contended"] = True
    assert "speed" in line_of(verdict.verdict(pd.DataFrame(records)), "nf4-dq").not_meaningful
    assert "speed" not in line_of(verdict.verdict(pd.DataFrame(records)), "int8").not_meaningful


def test_a_precision_whose_every_cell_failed_says_so_and_shows_no_figures():
    records = cpu_records()
    records[1].update(status="failed", error="OutOfMemoryError: boom", error_type="OutOfMemoryError")
    line = line_of(verdict.verdict(pd.DataFrame(records)), "int8")
    assert line.sentence() == "int8: no cell finished (OutOfMemoryError): no figures"


# ---- eval sets that cannot discriminate ----

def eval_records(images: int, captions: int, ks=(1, 5, 10), frozen: bool = False) -> list[dict]:
    records = []
    for precision in ("bf16", "nf4-dq"):
        record = make_record(precision, data__eval_images=images, data__eval_captions=captions)
        for k in ks:
            for side in ("i2t", "t2i", "mean"):
                after = min(1.0, 0.2 * k)
                record[f"quality.eval_after.{side}_recall@{k}"] = after
                record[f"quality.eval_before.{side}_recall@{k}"] = after if frozen or k >= images else after / 2
        records.append(record)
    return records


def test_recall_at_k_not_below_the_candidates_is_warned_about():
    warnings = eval_checks.eval_set_warnings(pd.DataFrame(eval_records(images=10, captions=10)))
    trivial = [w for w in warnings if "reads 100 % whatever the model" in w]
    assert len(trivial) == 2 and trivial[0].startswith("i2t recall@10 ranks 10 eval captions")
    assert not any("recall@10 is the same before and after" in w for w in warnings)  # said once, as trivial


def test_an_eval_set_where_one_query_exceeds_the_gate_tolerance_is_warned_about():
    warnings = eval_checks.eval_set_warnings(pd.DataFrame(eval_records(images=10, captions=10)))
    assert any(w.startswith("one query moves i2t recall by 10.00 points (10 eval images), more than the 3.00 points") for w in warnings)
    big = eval_checks.eval_set_warnings(pd.DataFrame(eval_records(images=160, captions=160)))
    assert not any("one query moves" in w for w in big)  # 0.63 points < 3


def test_a_metric_equal_before_and_after_in_every_cell_is_warned_about():
    warnings = eval_checks.eval_set_warnings(pd.DataFrame(eval_records(images=160, captions=160, frozen=True)))
    assert any(w.startswith("mean recall@1 is the same before and after fine-tuning in every cell (2 cells, 2 format(s)")
               for w in warnings)
    moving = eval_checks.eval_set_warnings(pd.DataFrame(eval_records(images=160, captions=160)))
    assert not any("is the same before and after" in w for w in moving)


def test_the_run_summary_and_the_report_carry_the_eval_warnings(tmp_path: Path, capsys):
    run = write_run(tmp_path / "run", eval_records(images=10, captions=10), suite_text='name = "ci"\n')
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "reads 100 % whatever the model" in capsys.readouterr().out
    assert "## Warnings" in (tmp_path / "report" / "report.md").read_text()


# ---- one source, one convention ----

@pytest.mark.parametrize("value, shown", [(-0.0001, "0.00"), (float("nan"), "—"), (None, "—"), (float("inf"), "∞"), (2.345, "2.35")])
def test_a_cell_is_never_nan_nor_minus_zero(value, shown):
    assert tables.format_value(value) == shown


def test_summary_md_and_report_md_tell_one_story_without_nan_or_minus_zero(tmp_path: Path):
    records = cpu_records()
    records[1]["speed.train_samples_per_s"] = None  # a figure that is missing
    records[0]["weights.load.error.rel_mean"] = -1e-7
    frame = pd.DataFrame(records)
    from qbench.analysis.report import summary

    (tmp_path / "run").mkdir()
    summary_md = summary.write_run_outputs(tmp_path / "run", frame)["summary"].read_text()
    report_md = write.write_report(frame, tmp_path / "report")["markdown"].read_text()
    headings = re.findall(r"^## (.+)$", report_md, flags=re.M)
    assert headings == re.findall(r"^## (.+)$", summary_md, flags=re.M)
    assert headings[:3] == ["Answer", "Verdict: each precision against bf16", "Relative to bf16"]
    for text in (summary_md, report_md):
        assert not re.search(r"\bnan\b", text) and "-0.00" not in text
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<strong>nf4-dq</strong>: weights 61 % smaller than bf16" in html


def test_every_renderer_shows_the_same_verdict(tmp_path: Path, capsys):
    run = write_run(tmp_path / "run", cpu_records(), suite_text='name = "ci"\n')
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    terminal = " ".join(capsys.readouterr().out.split())
    result = verdict.verdict(pd.DataFrame(cpu_records()))
    assert result.not_meaningful_everywhere == ("peak memory", "speed")  # said once, under the lines
    sentence = line_of(result, "nf4-dq").sentence(result.not_meaningful_everywhere)
    assert "not measured meaningfully" not in sentence
    assert sentence.removeprefix("nf4-dq") in terminal
    assert sentence.removeprefix("nf4-dq") in (tmp_path / "report" / "report.md").read_text()
    assert terminal.count("Not measured meaningfully on this CPU, for any precision: peak memory and speed") == 1


def test_without_a_finished_baseline_the_verdict_gives_absolute_figures_and_says_why():
    records = [r for r in cpu_records() if r["precision"] != "bf16"]
    result = verdict.verdict(pd.DataFrame(records))
    assert "no cell of the baseline precision bf16 finished" in result.notes[0]
    assert line_of(result, "nf4-dq").sentence().startswith("nf4-dq: weights 0.17 MiB; peak memory ")


def test_repeated_runs_of_one_seed_are_not_taken_for_the_seeds_spread():
    # three bit-identical repeats of seed 0 (a CI baseline): no spread of training noise to speak of
    records = [make_record(p, seed=0, run_id=f"run-{i}") for i in range(3) for p in ("bf16", "nf4-dq")]
    compared = stats.compare_quality(pd.DataFrame(records), "quality.eval_after.mean_recall@1").table
    assert compared.loc["nf4-dq", "verdict"] == "no interval to judge by"  # not "worse" on a zero-width interval


def test_a_precision_whose_model_gave_nan_outputs_is_never_read_as_a_quality_result():
    records = cpu_records(recalls=(0.40, 0.60, 0.41))  # int8 "better" by 20 points...
    for record in records:
        record["quality.eval_after.nonfinite_image_embeddings"] = 3 if record["precision"] == "int8" else 0
    result = verdict.verdict(pd.DataFrame(records))
    int8 = line_of(result, "int8")
    assert "from a model that gave 3 NaN or infinite outputs in evaluation" in int8.sentence()
    assert "quality" in int8.not_meaningful  # ...by a broken model: not the format's quality
    assert "NaN" not in line_of(result, "nf4-dq").sentence() and "quality" not in line_of(result, "nf4-dq").not_meaningful
    shown = {s.key: s for s in write.report_sections(pd.DataFrame(records))}
    assert "int8-seed0: the model's outputs were NaN or infinite" in shown["nonfinite"].text
