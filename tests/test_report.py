"""`qbench report`: merged run directories -> tables, plots and a self-contained HTML page."""

import base64
import re
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis import load, stats
from qbench.analysis.report import tables, write
from qbench.contract import fields

from .records import make_record, make_records, slower, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_shards(tmp_path: Path) -> list[Path]:
    """One suite run as two shards on two machines (one twice as slow), two seeds each."""
    first = write_run(tmp_path / "machine-a", [make_record(p, s, "run-a") for s in (0, 1) for p in ("bf16", "int8")])
    second = write_run(tmp_path / "machine-b", [slower(make_record(p, s, "run-b"), 2.0) for s in (0, 1) for p in ("bf16", "nf4-dq")])
    return [first, second]


def test_shards_merge_into_one_frame_with_every_cell(two_shards):
    frame = load.load_results(two_shards)
    assert len(frame) == 8
    assert stats.precision_order(frame) == ["bf16", "int8", "nf4-dq"]


def test_speed_ratios_use_the_baseline_of_the_same_run_and_seed(two_shards):
    frame = stats.add_speed_ratios(load.load_results(two_shards))
    nf4 = frame[(frame["precision"] == "nf4-dq")]["ratio.speed.train_samples_per_s"]
    assert nf4.tolist() == pytest.approx([15 / 20, 15 / 20])  # machine b is twice as slow, the ratio is not
    assert (frame[frame["precision"] == "bf16"]["ratio.speed.train_samples_per_s"] == 1).all()
    assert frame[frame["precision"] == "int8"]["ratio.speed.train_samples_per_s"].tolist() == pytest.approx([17 / 20] * 2)


def test_relative_table_gives_savings_as_smaller_than_the_baseline_and_speed_as_times_of_it():
    frame = pd.DataFrame(make_records())
    table = stats.relative_to_baseline(frame)
    assert table.loc["nf4-dq", "base weights vs bf16 (% smaller)"] == pytest.approx(100 * (1 - 174_930 / 445_450))
    assert table.loc["int8", "peak RSS vs bf16 (% smaller)"] == pytest.approx(100 * (1 - 690 / 580))  # negative: larger
    assert table.loc["nf4-dq", "Δ mean recall@1 after (points)"] == pytest.approx(-3.0)
    assert table.loc["nf4-dq", "train samples/s vs bf16 (×)"] == pytest.approx(15 / 20)  # higher = faster
    assert table.loc["bf16", "train samples/s vs bf16 (×)"] == pytest.approx(1.0)
    # one seed and no bootstrap interval in the records: a 3-point difference is not called worse
    assert table.loc["nf4-dq", "quality vs bf16"] == "no interval to judge by"


def test_a_quality_equal_but_for_float_rounding_is_the_same_not_worse():
    # two means of two recalls that are equal, but not in floating point: (0.1 + 0.2) / 2 != 0.3 / 2
    records = make_records()
    bf16 = (0.1 + 0.2) / 2
    records[0]["quality.eval_after.mean_recall@1"] = records[0]["quality.eval_before.mean_recall@1"] = bf16
    records[1]["quality.eval_after.mean_recall@1"] = records[1]["quality.eval_before.mean_recall@1"] = (0.0 + 0.3) / 2
    records[2]["quality.eval_after.mean_recall@1"] = bf16 - 0.0125  # a real difference of one query in 80 stays
    assert records[1]["quality.eval_after.mean_recall@1"] != bf16
    frame = pd.DataFrame(records)
    relative = stats.relative_to_baseline(frame)
    assert relative.loc["int8", "Δ mean recall@1 after (points)"] == 0.0
    assert relative.loc["int8", "quality vs bf16"] == "no difference the eval can detect"
    assert relative.loc["nf4-dq", "Δ mean recall@1 after (points)"] == pytest.approx(-1.25)
    shown = tables.display(relative)
    assert shown.loc["int8", "Δ mean recall@1 after (points) [95 % interval]"] == "0.00"  # not "-0.00"
    assert tables.quantization_damage(frame).loc["int8", "Δ mean recall@1 vs bf16 before training (points)"] == 0.0


def test_pareto_front_is_direction_aware():
    cost = pd.Series({"a": 1.0, "b": 2.0, "c": 3.0, "d": 2.5})
    quality = pd.Series({"a": 0.5, "b": 0.7, "c": 0.9, "d": 0.6})
    assert stats.pareto_front(cost, quality, higher_is_better=True).to_dict() == {"a": True, "b": True, "c": True, "d": False}
    # lower is better (perplexity): only the cheapest point with the lowest value survives
    assert stats.pareto_front(cost, quality, higher_is_better=False).to_dict() == {"a": True, "b": False, "c": False, "d": False}


def test_precision_table_gives_quality_an_interval_only_where_there_is_noise_to_make_one(two_shards):
    one_seed = tables.display(tables.precision_table(pd.DataFrame(make_records())))
    assert one_seed.loc["nf4-dq", "mean recall@1 after (%) [95 % interval]"] == "57.00"  # one seed, no bootstrap: no interval
    two_seeds = tables.precision_table(load.load_results(two_shards))
    assert two_seeds.loc["bf16", "seeds"] == 2
    # int8: 59 and 60 points, two seeds: 59.5 ± 1.96 · 0.71 / sqrt(2)
    assert two_seeds.loc["int8", "mean recall@1 after (%)"] == pytest.approx(59.5)
    assert two_seeds.loc["int8", "mean recall@1 after (%) high"] == pytest.approx(59.5 + 1.959964 * 0.5, abs=1e-4)


def test_report_writes_every_file_and_a_self_contained_html(two_shards, tmp_path: Path):
    paths = write.write_report(load.load_results(two_shards), tmp_path / "report")
    html = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # before -> after, quality vs memory, throughput, memory per phase, vs baseline (no loss curves in these records)
    assert len(images) == 5
    assert all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert all(source.startswith("data:") for source in sources)  # nothing is loaded from elsewhere
    for heading in ("Answer", "Verdict", "Per precision", "Relative to bf16", "Runs merged into this report"):
        assert heading in html
    assert html.index("Answer") < html.index("Verdict") < html.index("<h2>Plots</h2>") < html.index("Per precision")
    flat = pd.read_parquet(paths["parquet"])
    assert len(flat) == 8 and "ratio.speed.train_samples_per_s" in flat.columns
    assert len(pd.read_csv(paths["csv"])) == 8
    summary = pd.read_csv(paths["summary_csv"], index_col="precision")
    assert summary.loc["bf16", "memory.all_phases.rss_peak_bytes n"] == 4
    markdown = paths["markdown"].read_text()
    for link in re.findall(r"\]\((plots/[^)]+)\)", markdown):
        assert (paths["markdown"].parent / link).read_bytes().startswith(PNG_MAGIC)


def test_perplexity_records_get_a_report_without_special_cases(tmp_path: Path):
    records = []
    for precision, ppl in (("bf16", 10.0), ("int8", 10.2), ("nf4-dq", 11.0)):
        record = make_record(precision, task="causal_lm")
        for key in [k for k in record if k.startswith("quality.")]:
            del record[key]
        record["quality.eval_after.perplexity"] = ppl
        records.append(record)
    frame = pd.DataFrame(records)
    assert fields.first_present(frame, fields.HEADLINE_QUALITY) == "quality.eval_after.perplexity"
    table = stats.relative_to_baseline(frame)
    assert table.loc["nf4-dq", "Δ perplexity after"] == pytest.approx(1.0)
    assert table.loc["nf4-dq", "quality vs bf16"] == "no interval to judge by"
    paths = write.write_report(frame, tmp_path / "lm")
    assert paths["html"].read_text().count("data:image/png;base64,") == 4  # no quality before fine-tuning: no before -> after


def test_failed_cells_are_listed_and_left_out_of_the_means(tmp_path: Path):
    records = make_records()
    records.append(make_record("nf4-dq", seed=1, status="failed", error="OutOfMemoryError: boom", weights__load__base_bytes=1))
    frame = pd.DataFrame(records)
    shown = {s.key: s for s in write.report_sections(frame)}
    assert "OutOfMemoryError: boom" in shown["failures"].table.to_string()
    assert shown["per_precision"].table.loc["nf4-dq", "status"] == "failed,ok"
    assert shown["per_precision"].table.loc["nf4-dq", "base weights (MiB)"] == "0.17"  # the failed cell's 1 byte is left out
    assert "**nf4-dq**: weights 61 % smaller than bf16" in shown["verdict"].text
    assert "1 of 2 cells did not finish (" in shown["verdict"].text


def test_cli_report_merges_run_directories(two_shards, tmp_path: Path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["report", *map(str, two_shards), "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "plots" / "quality_vs_memory.png").is_file()
    shown = capsys.readouterr().out
    assert shown.index("Verdict") < shown.index("Relative to bf16") and "nf4-dq" in shown
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_cli_report_default_folder_is_inside_the_run(two_shards):
    assert cli.main(["report", str(two_shards[0])]) == 0
    assert (two_shards[0] / "report" / "report.md").is_file()
