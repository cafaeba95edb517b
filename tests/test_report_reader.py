"""The report a person reads (issue 23): the answer in one line from the figures, tables that fit 80 and 120
columns and a 1400-pixel page without a cut cell, words without negative savings, no claim about a figure that
was not measured, resumed runs' speed ratios marked, the loss curve and before -> after plots."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from qbench.analysis import stats
from qbench.analysis.report import layout, page, paper, plots, sections, write
from qbench.cell.train import loss_curve
from qbench.cli import render

from .records import make_record, make_records
from .test_verdict import cpu_records

MiB = 1024 * 1024


def rendered(shown: list[sections.Section], width: int, monkeypatch) -> str:
    """What the terminal shows of `shown` at `width` columns."""
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(render, "console", Console(file=io.StringIO(), width=width))
    render.sections(shown)
    render.answer(shown)
    return render.console.file.getvalue()


def wide_records() -> list[dict]:
    """Six precisions with long figures (intervals, verdict words), one failed: the tables a real run shows."""
    records = []
    for precision, recall in (("bf16", 0.7156), ("int8", 0.7156), ("nf4-dq", 0.6750), ("nf4", 0.40)):
        record = make_record("bf16" if precision in ("bf16", "nf4") else precision)
        record.update({"precision": precision, "cell_id": f"{precision}-seed0", "quality.eval_after.mean_recall@1": recall,
                       "interval.eval_after.mean_recall@1.low": recall - 0.05, "interval.eval_after.mean_recall@1.high": recall + 0.05,
                       "interval.eval_after.mean_recall@1.se": 0.025, "weights.load.base_bytes": 174_930 if "nf4" in precision
                       else record["weights.load.base_bytes"]})
        records.append(record)
    failed = make_record("int8", status="failed", error="RuntimeError: boom", weights__base_bytes=None)
    failed.update({"precision": "fp4", "cell_id": "fp4-seed0", "quality.eval_after.mean_recall@1": None})
    return records + [failed]


# ---- the answer ---------------------------------------------------------------------------------------------

def test_the_answer_says_what_each_precision_saves_costs_and_what_this_device_cannot_measure():
    line = sections.ReportData(pd.DataFrame(cpu_records(se=0.04))).answer.markdown()
    assert line.startswith("nf4-dq stores the base 61 % smaller than bf16; int8 43 % smaller;")
    # -1 and -3 points with a standard error of 4 points each: inside the interval of the difference
    assert "int8 and nf4-dq show no difference the eval can detect (differences up to" in line
    assert line.endswith("this CPU could not measure peak memory or speed meaningfully (measure them on a GPU).")


def test_the_answer_names_a_difference_the_interval_excludes_and_follows_the_figures():
    line = sections.ReportData(pd.DataFrame(cpu_records(se=0.004, recalls=(0.60, 0.59, 0.50)))).answer.markdown()
    assert "nf4-dq is worse by 10.0 points [-11.1, -8.9]" in line
    assert "int8 shows no difference the eval can detect" in line


def test_on_a_gpu_the_answer_gives_memory_and_speed_too():
    records = cpu_records()
    for record in records:
        record["env.device"] = "cuda:0"
        record["memory.train.torch_allocated_peak_bytes"] = record["weights.load.base_bytes"] * 10
    line = sections.ReportData(pd.DataFrame(records)).answer.markdown()
    assert "peak memory: nf4-dq 61 % smaller than bf16; int8 43 % smaller" in line
    assert "train at int8 0.85×, nf4-dq 0.75× bf16's speed" in line
    assert "could not measure" not in line


def test_a_failed_precision_has_no_figure_in_the_answer_and_says_why():
    line = sections.ReportData(pd.DataFrame(wide_records())).answer.markdown()
    assert "fp4: no figures (failed)" in line and "fp4 stores" not in line


def test_the_answer_is_first_and_last_in_the_terminal(monkeypatch):
    shown = write.report_sections(pd.DataFrame(cpu_records()))
    out = rendered(shown, 120, monkeypatch)
    assert out.startswith("Answer ─")
    assert out.rstrip().splitlines()[-1].endswith("(measure them on a GPU).")
    assert "Answer: nf4-dq stores the base 61 % smaller" in " ".join(out.split())


# ---- nothing cropped, nothing repeated ----------------------------------------------------------------------

@pytest.mark.parametrize("width", [80, 120])
def test_no_table_cell_is_cut_at_80_or_120_columns(width, monkeypatch):
    shown = write.report_sections(pd.DataFrame(wide_records()))
    out = rendered(shown, width, monkeypatch)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width and "…" not in out
    text = " ".join(re.sub(r"[│┃┏┓┗┛┡┩┣┫━─┳┻╇╈┼└┘┌┐├┤┬┴]", " ", out).split())
    for section in shown:
        if section.table is None:
            continue
        for value in section.table.to_numpy().ravel():
            for word in str(value).split():  # a cell may wrap at a space, never inside a word
                assert word in text, (section.key, value)


def test_piped_output_is_not_laid_out_for_80_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(render, "console", Console(file=io.StringIO()))  # not a terminal
    assert render.layout_width() is None
    render.sections(write.report_sections(pd.DataFrame(wide_records())))
    lines = render.console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) > 80  # a table as wide as it is, prose as long lines
    assert all(line == line.rstrip() for line in lines if not line.startswith(("│", "┃", "┏", "┡", "└")))


def test_a_table_splits_into_tables_that_fit_and_repeat_the_row_names():
    frame = pd.DataFrame({f"precision {i}": ["71.56 [66.56, 76.56]", "no difference the eval can detect"] for i in range(6)},
                         index=["mean recall@1 after (%)", "quality vs bf16"])
    groups = layout.column_groups(frame, 80)
    assert len(groups) == 3 and [len(g) for g in groups] == [2, 2, 2]  # shared out evenly
    assert layout.column_groups(frame, None) == [list(range(6))]
    for table in render.table(frame, "", 80):
        console = Console(file=io.StringIO(), width=80)
        console.print(table)
        out = console.file.getvalue()
        assert "mean recall@1 after (%)" in out and max(map(len, out.splitlines())) <= 80


def test_the_busy_cpu_table_says_its_explanation_once():
    records = cpu_records()
    for record in records:
        record.update({"speed.contended": True, "cpu.train.share": 0.4, "cpu.train.others_busy_cores": 1.6,
                       "speed.contention": "contended: while training, the cell's threads waited for a core 60% of the time"})
    (section,) = [s for s in write.report_sections(pd.DataFrame(records)) if s.key == "contended"]
    assert "waited for a core" in section.text
    assert "waited for a core" not in section.table.to_string()  # no sentence repeated per cell
    assert list(section.table["had the CPU (% of the time it wanted it)"]) == ["40.0"] * 3


def test_html_tables_fit_a_1400_pixel_page_without_scrolling(tmp_path: Path):
    frame = pd.DataFrame(wide_records())
    html = write.write_report(frame, tmp_path / "report")["html"].read_text()
    assert "overflow-x" not in html and "nowrap; }" not in html.replace("td.figure { white-space: nowrap; }", "")
    for table in re.findall(r"<table>(.*?)</table>", html, re.S):
        rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
        shown = pd.DataFrame([row[1:] for row in rows[1:]], columns=rows[0][1:], index=[row[0] for row in rows[1:]])
        row_names, columns = layout.needs(shown, page.PAGE_TEXT_LINES)
        assert layout.FRAME + row_names + 3 + sum(c + 3 for c in columns) <= page.PAGE_CHARACTERS


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_no_table_of_the_report_scrolls_in_chromium_at_1400_pixels(tmp_path: Path):
    html = write.write_report(pd.DataFrame(wide_records()), tmp_path / "report")["html"]
    probe = html.with_name("probe.html")
    probe.write_text(html.read_text().replace("</body>", """<script>window.addEventListener('load', () => {
      const pre = document.createElement('pre'); pre.id = 'probe';
      pre.textContent = document.documentElement.scrollWidth + ' ' + document.documentElement.clientWidth + ' ' +
        Math.max(...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right)) + ' ' +
        document.querySelector('h1').getBoundingClientRect().right;
      document.body.appendChild(pre); });</script></body>"""))
    profile = tmp_path / "profile"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", "--window-size=1400,2000", "--dump-dom", "--virtual-time-budget=5000",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    scroll, client, rightmost, _ = (float(v) for v in re.search(r'<pre id="probe">([^<]*)</pre>', dom).group(1).split())
    assert scroll <= client and rightmost <= client


# ---- words and signs ----------------------------------------------------------------------------------------

def test_sizes_read_smaller_or_larger_never_a_negative_less():
    shown = {s.key: s for s in write.report_sections(pd.DataFrame(cpu_records(pss=True)))}
    table = shown["relative"].table
    assert table.loc["int8", "peak PSS vs bf16"] == "23 % larger"
    assert table.loc["nf4-dq", "base weights vs bf16"] == "61 % smaller"
    assert "bf16" not in table.index  # the baseline is not compared with itself
    assert not re.search(r"less than|-\d", " ".join(table.loc[:, table.columns.str.endswith("vs bf16")].to_numpy().ravel()))


def test_one_wording_for_a_difference_the_eval_cannot_detect():
    records = cpu_records(se=0.04, recalls=(0.60, 0.60, 0.57))  # int8 equal, nf4-dq inside the noise
    verdicts = stats.compare_quality(pd.DataFrame(records), "quality.eval_after.mean_recall@1").table["verdict"]
    assert verdicts["int8"] == verdicts["nf4-dq"] == stats.NO_DIFFERENCE


def test_the_dense_arms_weight_error_is_explained_as_its_cast():
    records = cpu_records()
    records[0].update({"weights.load.quantized_params": 0, "weights.load.error.rel_mean": 0.0017, "precision.dense_dtype": "bfloat16"})
    records[2].update({"weights.load.quantized_params": 741_376, "weights.load.error.rel_mean": 0.092})
    (damage,) = [s for s in write.report_sections(pd.DataFrame(records)) if s.key == "damage"]
    assert "bf16's 0.17 % is its checkpoint's weights rounded to bfloat16, the dtype it computes in" in damage.note


# ---- no claim about a figure that was not measured ----------------------------------------------------------

def test_a_missing_difference_stays_missing():
    delta = stats.delta_to(pd.Series([0.5, float("nan"), 0.3 + 1e-12]), 0.3)
    assert delta.iloc[0] == pytest.approx(0.2) and math.isnan(delta.iloc[1]) and delta.iloc[2] == 0.0


@pytest.mark.parametrize("status", ["failed", "interrupted", "running"])
def test_a_cell_that_did_not_finish_has_no_delta_no_verdict_and_no_same_anywhere(status, tmp_path: Path):
    records = make_records()
    records[2] = make_record("nf4-dq", status=status, weights__base_bytes=None, memory__peak_rss_bytes=None,
                             speed__train_samples_per_s=None)
    records[2]["quality.eval_after.mean_recall@1"] = None
    frame = pd.DataFrame(records)
    table = stats.relative_to_baseline(frame)
    assert math.isnan(table.loc["nf4-dq", "Δ mean recall@1 after (points)"])
    assert table.loc["nf4-dq", "quality vs bf16"] == f"not measured: no cell finished ({status})"
    paths = write.write_report(frame, tmp_path / "report")
    for text in (paths["markdown"].read_text(), paths["html"].read_text()):
        row = next(line for line in text.splitlines() if "nf4-dq" in line and "not measured" in line)
        assert "same" not in row and "0.0" not in row and "no difference" not in row


def test_without_a_finished_baseline_nothing_is_compared_and_the_answer_says_why():
    records = make_records()
    records[0]["status"] = "failed"
    frame = pd.DataFrame(records)
    assert stats.relative(frame) is None and stats.relative_to_baseline(frame).empty
    assert sections.ReportData(frame).answer.markdown() == (
        "No answer: no cell of the baseline precision bf16 finished, so nothing could be compared with it.")


def test_a_finished_baseline_without_any_figure_compared_is_not_called_unfinished():
    records = make_records()
    for record in records:
        if record["precision"] == "bf16":
            for key in [k for k in record if k.startswith(("weights.", "memory.", "speed."))]:
                record[key] = None
    frame = pd.DataFrame(records)
    assert records[0]["status"] == "ok" and stats.relative(frame) is None
    said = sections.ReportData(frame).answer.markdown()
    assert said.startswith("No answer: the cells of the baseline precision bf16 finished without") and "no cell" not in said


def test_a_baseline_without_the_figure_gives_no_difference_either():
    records = make_records(seeds=(0, 1))
    for record in records:
        if record["precision"] == "bf16":
            record["quality.eval_after.mean_recall@1"] = None
    table = stats.relative_to_baseline(pd.DataFrame(records))
    assert not any(str(c).startswith(("Δ", "quality vs")) for c in table.columns)  # no difference made up


# ---- resumed runs -------------------------------------------------------------------------------------------

def test_speed_ratios_of_cells_timed_in_different_sessions_are_marked_mixed():
    records = cpu_records()
    for record in records:
        record["run_session"] = "2026-01-01T10:00:00+00:00" if record["precision"] == "bf16" else "2026-01-01T11:00:00+00:00"
    frame = pd.DataFrame(records)
    assert stats.mixed_sessions(frame).to_dict() == {"bf16": False, "int8": True, "nf4-dq": True}
    data = sections.ReportData(frame)
    relative = sections.relative_section(data).table
    assert relative.loc["int8", "train samples/s vs bf16"] == "0.85× (mixed sessions)"
    assert "different sessions of a resumed run" in data.verdict.markdown()
    same = pd.DataFrame(cpu_records()).assign(run_session="2026-01-01T10:00:00+00:00")
    assert not stats.mixed_sessions(same).any()


# ---- the QLoRA paper section --------------------------------------------------------------------------------

def test_the_paper_section_judges_nf4_dq_against_the_dense_arm_in_the_dtype_it_ran():
    records = []
    for precision, before, after in (("dense", 0.30, 0.70), ("nf4-dq", 0.20, 0.69)):
        record = make_record("bf16" if precision == "dense" else precision)
        record.update({"precision": precision, "baseline_precision": "dense", "precision.dense_dtype":
                       "bfloat16" if precision == "dense" else None, "quality.eval_before.mean_recall@1": before,
                       "quality.eval_after.mean_recall@1": after})
        for phase in ("eval_before", "eval_after"):
            record[f"interval.{phase}.mean_recall@1.se"] = 0.01
        records.append(record)
    line = paper.recovery_line(pd.DataFrame(records))
    assert "nf4-dq − dense (bfloat16)" in line.qbench and line.verdict == paper.AGREES  # 10 points gap -> 1 point


# ---- plots and the loss curve -------------------------------------------------------------------------------

def test_the_loss_curve_keeps_every_step_then_means_of_intervals():
    assert loss_curve([3.0, 2.0, 1.0]) == ([3.0, 2.0, 1.0], 1)
    curve, every = loss_curve([float(i) for i in range(1000)], points=500)
    assert every == 2 and len(curve) == 500 and curve[:2] == [0.5, 2.5]
    curve, every = loss_curve([1.0] * 7, points=3)
    assert every == 3 and curve == [1.0, 1.0, 1.0]  # the last interval is shorter


def test_the_report_draws_the_loss_curves_and_quality_before_and_after(tmp_path: Path):
    records = cpu_records()
    for record in records:
        record["train.loss_curve"] = [3.0 - 0.01 * i for i in range(200)]
        record["train.loss_curve_every_steps"] = 1
    frame = pd.DataFrame(records)
    assert plots.loss_curves(frame) is not None and plots.before_after(frame) is not None
    paths = write.write_report(frame, tmp_path / "report")
    assert paths["plot:loss_curves"].exists() and paths["plot:before_after"].exists()
    csv = pd.read_csv(paths["csv"])  # the curve read back as text from a table still draws
    assert plots.loss_curves(csv) is not None


def test_the_throughput_plot_is_per_cpu_second_when_cells_were_contended():
    records = cpu_records()
    for record in records:
        record.update({"speed.contended": record["precision"] == "int8", "speed.train_samples_per_cpu_s": 30.0})
    plot = plots.throughput(pd.DataFrame(records))
    assert plot is not None and "CPU-second" in plot.title


# ---- files and logs ------------------------------------------------------------------------------------------

def test_the_report_folder_follows_the_umask(tmp_path: Path):
    code = ("import os, sys, pandas as pd; os.umask(0o022); sys.path.insert(0, '.');"
            "from tests.records import make_records; from qbench.analysis.report import write;"
            f"write.write_report(pd.DataFrame(make_records()), {str(tmp_path / 'report')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1],
                   env={**os.environ, "MPLBACKEND": "Agg"})
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == 0o755


def test_a_cell_log_holds_no_progress_bars_deprecations_or_repeats():
    code = """
import logging, warnings, sys
from qbench.cell.pipeline import quiet_libraries
quiet_libraries()
from transformers.utils import logging as hf
from tqdm.auto import tqdm
print(hf.is_progress_bar_enabled(), file=sys.stderr)
warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
for _ in range(3):
    logging.getLogger("bitsandbytes.autograd._functions").warning("inputs will be cast")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["False", "bitsandbytes.autograd._functions: inputs will be cast"]
