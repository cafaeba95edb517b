"""The parts of a report, each made once from the records and shown alike by every renderer (terminal, summary.md,
report.md, HTML): a title, Markdown text, a table of display strings, and a note under the table.

One set of conventions holds in every table: units in every header, "—" for a missing figure (with why
beside it), never "nan" or "-0.00"; sizes are "N % smaller" / "N % larger" than the baseline's; ratios
"0.81×" the baseline's (above 1: more); quality figures carry their interval, "[low, high]".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report import tables
from qbench.analysis.report.answer import Answer, answer
from qbench.analysis.report.eval_checks import eval_set_warnings
from qbench.analysis.report.explain import weight_bytes_explanation
from qbench.analysis.report.findings import load_report_findings, nonfinite_findings
from qbench.analysis.report.verdict import MIXED_MARK, Verdict, smaller_by, verdict
from qbench.contract import fields

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings


@dataclass(frozen=True)
class Section:
    """One titled part of a report. `table` holds display strings (tables.display); `wide`: the terminal turns
    it so that precisions are columns; `key` names it for code that picks sections (the terminal after a run)."""

    key: str
    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    note: str = ""
    wide: bool = False

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.text:
            parts.append(self.text)
        if self.table is not None and not self.table.empty:
            parts.append(self.table.to_markdown(disable_numparse=True, colalign=("left", *("right",) * len(self.table.columns))))
        if self.note:
            parts.append(f"*{self.note}*")
        return "\n\n".join(parts) + "\n"


class ReportData:
    """What every section is made from: the records (one frame, speed ratios added once), the suite's gate
    settings (for the eval-set warnings), and what is worked out once and shown in several sections."""

    def __init__(self, frame: pd.DataFrame, settings: Settings | None = None):
        throughput = tuple(c for c in fields.HEADLINE_THROUGHPUT if c in frame.columns)
        self.frame = stats.add_speed_ratios(frame, throughput) if throughput and not frame.empty else frame
        self.settings = settings
        self.baseline = stats.baseline_precision(frame) or "the baseline"
        self.interval = stats.confidence_label(frame) if not frame.empty else stats.confidence_label()
        self.warnings = eval_set_warnings(frame, settings) if not frame.empty else []
        self.verdict: Verdict = verdict(frame, self.warnings)
        self.answer: Answer | None = answer(self.frame, self.verdict)

    def display(self, table: pd.DataFrame, digits: int | dict[str, int] = 2) -> pd.DataFrame:
        return tables.display(table, digits, self.interval)


ANSWER_TITLE = "Answer"


def answer_section(data: ReportData) -> Section | None:
    """The run's answer in a line (one per value of a grid's other axes), before everything else."""
    if data.answer is None:
        return None
    return Section("answer", ANSWER_TITLE, text=data.answer.markdown())


def verdict_section(data: ReportData) -> Section | None:
    if not data.verdict.lines:
        return None
    return Section("verdict", f"Verdict: each precision against {data.baseline}", text=data.verdict.markdown())


def nonfinite_section(data: ReportData) -> Section | None:
    """The cells whose model gave NaN or infinite outputs in evaluation, in words (`findings.nonfinite_findings`)."""
    found = nonfinite_findings(data.frame)
    if not found:
        return None
    return Section("nonfinite", "Non-finite model outputs: a format that breaks the model",
                   text="\n".join(f"- {line}" for line in found))


def warnings_section(data: ReportData) -> Section | None:
    if not data.warnings:
        return None
    return Section("warnings", "Warnings: this eval set cannot tell some things apart",
                   text="\n".join(f"- {warning}" for warning in data.warnings))


def relative_display(table: pd.DataFrame, interval: str, baselines: set[str] = frozenset()) -> pd.DataFrame:
    """`stats.relative_to_baseline` for a reader: the comparisons only (the `baselines` arms, which compare with
    themselves, left out), sizes as "69 % smaller" / "19 % larger", ratios as "0.81×" (marked where they mix
    sessions of a resumed run), the quality difference with its interval and its word."""
    table = table[~table.index.isin(list(baselines))]
    mixed = table[stats.MIXED] if stats.MIXED in table.columns else pd.Series(False, index=table.index)
    shown = tables.display(table.drop(columns=[c for c in table.columns if c == stats.MIXED or c.endswith(stats.SMALLER)
                                               or c.endswith(stats.TIMES)]), 1, interval)
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith(stats.SMALLER):
            out[column.removesuffix(stats.SMALLER).rstrip()] = [smaller_by(v) for v in table[column]]
        elif column.endswith(stats.TIMES):
            out[column.removesuffix(stats.TIMES).rstrip()] = [
                "—" if pd.isna(v) else f"{tables.format_value(v, 2)}×" + (f" ({MIXED_MARK})" if bool(m) else "")
                for v, m in zip(table[column], mixed, strict=True)]
    for column in shown.columns:
        out[column] = shown[column]
    return out


def relative_section(data: ReportData) -> Section | None:
    table = stats.relative_to_baseline(data.frame)
    if table.empty:
        return None
    relative = stats.relative(data.frame)
    baselines = {arm for arm in table.index if relative is not None and relative.base_of(arm) == arm}
    shown = relative_display(table, data.interval, baselines)
    if shown.empty:
        return None
    b = data.baseline
    note = (f"Sizes: smaller or larger than {b}'s by the percentage shown. Speed: a multiple of {b}'s, measured within "
            f"one run (above 1: faster). Δ: this precision minus {b}, with the {data.interval} of the difference; "
            f"\"{stats.NO_DIFFERENCE}\" when it holds 0.")
    if any(c.startswith("peak above the process baseline") for c in shown.columns):
        note += " The peak above the process baseline leaves out what the process held before the model was loaded."
    return Section("relative", f"Relative to {b}", table=shown, note=note)


def per_precision_section(data: ReportData) -> Section | None:
    table = tables.precision_table(data.frame)
    if table.empty:
        return None
    return Section("per_precision", "Per precision (mean over ok cells)", table=data.display(table, {"seeds": 0}),
                   note=f"Quality with its {data.interval} (bootstrap over eval queries, combined with the seeds' spread "
                        "where there are several seeds). Peak memory from the source that means most on this device.",
                   wide=True)


def quality_section(data: ReportData) -> Section | None:
    table = tables.quality_table(data.frame)
    if table.empty:
        return None
    return Section("quality", "Quality, every metric", table=table, note=" ".join(measured_how(data.frame)))


def measured_how(frame: pd.DataFrame) -> list[str]:
    """How the quality figures were made, as the records say: the evaluation protocol (a perplexity's window
    protocol, lm-eval's rolling one or qbench's disjoint windows) and, for a contrastive fine-tune, how many
    negatives each query was trained against."""
    lines = []
    for column, what in (("eval.protocol", "Evaluation protocol"), ("train.negatives_per_query", "Negatives per query in training")):
        if column not in frame.columns or frame[column].dropna().empty:
            continue
        values = sorted({str(v) for v in frame[column].dropna()})
        if column == "train.negatives_per_query":
            mode = sorted({str(v) for v in frame.get("train.contrastive_batch", pd.Series(dtype=str)).dropna()})
            how = {"micro_batch": "each micro-batch's own pairs", "step": "every micro-batch's pairs of the step"}
            lines.append(f"{what}: {', '.join(values)} ({'; '.join(how.get(m, m) for m in mode) or 'one batch'}).")
        else:
            lines.append(f"{what}: {' | '.join(values)}.")
    return lines


def base_origin_section(data: ReportData) -> Section | None:
    """What the base really is, when its checkpoint says (a converted one: builtin:smollm2-135m's bf16 is 4-bit-derived),
    and the weights transformers initialised or dropped loading it (`findings.load_report_findings`)."""
    frame = data.frame
    lines = []
    model = frame["model"].dropna().iloc[0] if "model" in frame.columns and frame["model"].notna().any() else "the model"
    if "model.base_origin" in frame.columns and not frame["model.base_origin"].dropna().empty:
        lines.append(f"The base of {model} is {frame['model.base_origin'].dropna().iloc[0]}.")
    lines += [f"- {line}" for line in load_report_findings(frame)]
    if not lines:
        return None
    return Section("base_origin", "What the base is", text="\n".join(lines))


def damage_section(data: ReportData) -> Section | None:
    table = tables.quantization_damage(data.frame)
    if table.empty:
        return None
    return Section("damage", "Quantization damage before fine-tuning", table=data.display(table),
                   note=tables.cast_error_note(data.frame))


def weight_bytes_section(data: ReportData) -> Section | None:
    text = weight_bytes_explanation(data.frame)
    return Section("weight_bytes", "Why a 4-bit base is not 4x smaller", text=text) if text else None


def memory_section(data: ReportData) -> Section | None:
    table = tables.memory_table(data.frame)
    if table.empty:
        return None
    note = ("\"before load\": what the process held before the model was loaded (the runtime: Python, torch, the data); "
            "each phase's peak includes it.")
    return Section("memory", "Peak memory per phase (MiB)", table=data.display(table, 1), note=note, wide=len(table.columns) > 6)


def time_section(data: ReportData) -> Section | None:
    table = tables.time_split_table(data.frame)
    if table.empty:
        return None
    note = ("The parts add up to the wall time of each cell's process (launch to exit); `other` is what the harness "
            "spent around them: launch, environment, sampler start, record checkpoints, exit.")
    return Section("time", "Where each cell's time went (s, mean per precision)", table=data.display(table), note=note,
                   wide=True)


def contended_section(data: ReportData) -> Section | None:
    table = tables.contended_table(data.frame)
    if table.empty:
        return None
    text = ("These cells' threads waited for a core while they trained (for a share of the time they were ready to "
            "run, beside other processes' busy cores): their wall-clock speed says more about the machine's load than "
            "about the format. Read their samples per CPU-second; `qbench compare` judges CPU time on a CPU and leaves "
            "these wall-time ratios out.")
    return Section("contended", "Cells timed on a busy CPU", text=text, table=data.display(table, 1))


def failures_section(data: ReportData) -> Section | None:
    table = tables.failures(data.frame)
    if table.empty:
        return None
    return Section("failures", "Cells that did not finish", table=data.display(table.set_index("cell_id")))


def provenance_section(data: ReportData) -> Section | None:
    table = tables.provenance_table(data.frame)
    if table.empty:
        return None
    return Section("provenance", "Runs merged into this report", table=data.display(table), wide=True)


def build(data: ReportData, makers) -> list[Section]:
    """The sections `makers` (functions of ReportData) make, in their order, leaving out the empty ones."""
    return [section for section in (make(data) for make in makers) if section is not None]
