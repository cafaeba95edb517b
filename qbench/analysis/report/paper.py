"""The QLoRA paper's claims (Dettmers et al., 2023, arXiv:2305.14314) next to qbench's measured figures.

Three lines, each with the paper's figure, qbench's, and a verdict — agrees, disagrees, inside the
noise, or not measured (and which precisions or figures it needs):

1. Double quantization stores the quantization constants in 0.127 instead of 0.5 bits per parameter
   (0.373 saved): 32-bit absmax per block of 64 = 32/64 = 0.5; with double quantization 8-bit absmax per
   block of 64 plus a 32-bit constant per 256 blocks = 8/64 + 32/(64·256) = 0.127 (paper, section 3).
   qbench's figure is exact (bytes read back from the loaded base), so the verdict needs no interval.
2. NF4 gives a better base than FP4 before any fine-tuning (paper, Table 2: Pile Common Crawl mean
   perplexity over OPT, BLOOM, LLaMA and Pythia models of 125M to 13B parameters, NF4 with double
   quantization 27.41 against FP4 (E2M1) 31.07; bitsandbytes' fp4 is E2M1).
3. LoRA fine-tuning recovers the 4-bit base's loss: after fine-tuning NF4 with double quantization
   matches 16-bit (paper: abstract, "preserving full 16-bit finetuning task performance", and Table 4).
   qbench compares the gap to the 16-bit arm before and after its fine-tune.

A difference within 1.96 standard errors of the difference is "no difference the eval can detect". For perplexity the
standard error comes from a paired bootstrap over the eval windows, when the records carry each
window's summed NLL (`per_window.<phase>.window_nll`, `per_window.scored_tokens`): every replicate
resamples the same windows for every arm, so the spread of the text's difficulty, which all arms share,
cancels. Otherwise it comes from the records' 95 % bootstrap intervals (`interval.<phase>.<metric>.se`,
or `.low` / `.high`), combined over seeds and added in quadrature — which ignores that the arms read the
same windows and so errs wide (docs/real-model.md shows both on SmolLM2).
Without either the verdict says "no interval".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report.tables import ok_means
from qbench.contract import fields, intervals, precisions

PAPER = "QLoRA (Dettmers et al., 2023, arXiv:2305.14314)"
TITLE = "The QLoRA paper side by side"
Z_95 = stats.z_for(0.95)  # intervals and verdicts use the same confidence

# the paper's bits per parameter for the quantization constants, without and with double quantization
PAPER_SCALE_BITS = {"plain": 0.5, "double": 8 / 64 + 32 / (64 * 256)}
SCALE_BITS_TOLERANCE = 0.005  # bits/param: padding of the last nested block moves the measured figure by less
PAPER_PILE_CC = {"nf4-dq": 27.41, "fp4": 31.07}

AGREES, DISAGREES, NOISE, NOT_MEASURED = "agrees", "disagrees", stats.NO_DIFFERENCE, stats.NOT_MEASURED


@dataclass(frozen=True)
class PaperLine:
    """One claim of the paper against qbench's figure: `verdict` is agrees / disagrees / NOISE (no difference the eval can detect) /
    not measured, with " (no interval)" appended when the records carry no interval to judge the noise."""

    claim: str
    paper: str
    qbench: str
    verdict: str


@dataclass(frozen=True)
class Estimate:
    """A per-precision mean over seeds and its standard error (None when no interval or spread is known)."""

    value: float
    se: float | None


def _interval_se(rows: pd.DataFrame, metric: str) -> pd.Series | None:
    """Each row's bootstrap standard error of `quality.<phase>.<name>`, from `interval.<phase>.<name>.se`
    or, without it, from the 95 % bounds; None when the records hold no interval for it."""
    key = "interval." + metric.removeprefix("quality.")
    if f"{key}.se" in rows.columns and rows[f"{key}.se"].notna().all():
        return rows[f"{key}.se"].astype(float)
    if f"{key}.low" in rows.columns and f"{key}.high" in rows.columns:
        width = rows[f"{key}.high"].astype(float) - rows[f"{key}.low"].astype(float)
        if width.notna().all():
            return width / (2 * Z_95)
    return None


def estimate(frame: pd.DataFrame, precision: str, metric: str) -> Estimate | None:
    """Mean of `metric` over the precision's ok cells and its standard error: the bootstrap intervals'
    (mean squared se over n cells) plus, with several seeds, the seeds' spread (std / sqrt n)."""
    if metric not in frame.columns:
        return None
    rows = stats.ok_rows(frame)
    rows = rows[rows["precision"] == precision]
    values = rows[metric].astype(float).dropna() if not rows.empty else pd.Series(dtype=float)
    if values.empty:
        return None
    n = len(values)
    interval = _interval_se(rows.loc[values.index], metric)
    if interval is None:
        return Estimate(float(values.mean()), None)
    variance = float((interval**2).mean()) / n
    if n > 1:
        variance += float(values.std(ddof=1)) ** 2 / n
    return Estimate(float(values.mean()), math.sqrt(variance))


PAIRED_RESAMPLES = 2000


WINDOW_PHASES = ("eval_before", "eval_after", "merge_dequantized", "merge_requantized")  # per_window.<phase>.*


def _window_scores(row: pd.Series, phase: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(summed NLL per window, scored tokens per window) of a causal-LM record, or None when it has none."""
    nll, tokens = row.get(f"per_window.{phase}.window_nll"), row.get("per_window.scored_tokens")
    if not isinstance(nll, list | tuple | np.ndarray) or not isinstance(tokens, list | tuple | np.ndarray):
        return None
    nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    return (nll, tokens) if nll.shape == tokens.shape and nll.size > 1 and np.isfinite(nll).all() else None


def paired_estimate(frame: pd.DataFrame, arms: list[tuple[str, str]],
                    statistic: Callable[[list[np.ndarray]], np.ndarray]) -> Estimate | None:
    """A statistic of several arms' perplexities, with a bootstrap standard error that resamples the *same*
    eval windows for every arm (the arms read the same text, so most of the window-to-window spread cancels):
    `intervals.bootstrap`, paired over the windows.

    `arms` are (precision, phase) pairs; `statistic` maps their perplexities (arrays: one value per bootstrap
    replicate) to the figure, e.g. ``lambda p: p[1] - p[0]``. Cells are paired by seed; with several seeds
    the standard error adds the seeds' spread. None unless every arm has per-window scores on identical
    windows (same data, protocol and tokens per window), so the caller falls back to unpaired intervals.
    """
    unknown = sorted({phase for _, phase in arms} - set(WINDOW_PHASES))
    if unknown:  # a misspelt phase would read no scores and fall back to wider intervals without a word
        raise ValueError(f"no per-window scores are recorded for phase {', '.join(unknown)}; phases: {', '.join(WINDOW_PHASES)}")
    rows = stats.ok_rows(frame)
    if "seed" not in rows.columns or "per_window.scored_tokens" not in rows.columns:
        return None

    def of_windows(*arrays: np.ndarray, axis: int) -> np.ndarray:
        *nlls, tokens = arrays
        return np.asarray(statistic([np.exp(nll.sum(axis=axis) / tokens.sum(axis=axis)) for nll in nlls]))

    results = []
    for _, group in rows.groupby("seed", sort=True):
        scores = []
        for precision, phase in arms:
            chosen = group[group["precision"] == precision]
            found = _window_scores(chosen.iloc[0], phase) if len(chosen) == 1 else None
            if found is None:
                return None
            scores.append(found)
        same = [group.loc[group["precision"].isin([p for p, _ in arms]), key].astype(str).nunique() <= 1
                for key in ("data.sha256", "eval.protocol") if key in group.columns]
        tokens = scores[0][1]
        if not all(same) or any(not np.array_equal(t, tokens) for _, t in scores):
            return None
        samples = [nll for nll, _ in scores] + [tokens]
        value = float(of_windows(*samples, axis=-1))
        (interval,) = intervals.bootstrap(samples, of_windows, paired=True, resamples=PAIRED_RESAMPLES)
        if interval.se is None:
            return None
        results.append((value, interval.se))
    if not results:
        return None
    values, ses = np.array([v for v, _ in results]), np.array([se for _, se in results])
    variance = float((ses**2).mean()) / len(values) + (float(values.std(ddof=1)) ** 2 / len(values) if len(values) > 1 else 0.0)
    return Estimate(float(values.mean()), math.sqrt(variance))


def difference_se(*parts: Estimate | None) -> float | None:
    """Standard error of a difference of independent estimates (quadrature); None when one has no se."""
    ses = [p.se for p in parts if p is not None]
    if len(ses) != len(parts) or any(se is None for se in ses):
        return None
    return math.sqrt(sum(se**2 for se in ses))


def judge(difference: float, se: float | None) -> str:
    """`difference` > 0 means the paper's claim holds: agrees / disagrees beyond 1.96 se, else NOISE."""
    if se is None:
        return (AGREES if difference > 0 else DISAGREES) + " (no interval)"
    if abs(difference) <= Z_95 * se:
        return NOISE
    return AGREES if difference > 0 else DISAGREES


def _shown(value: Estimate | None, digits: int = 2, factor: float = 1.0) -> str:
    """"0.28 ± 0.05" (a recall with `factor` 100: "28.44 ± 5.00"): the value and its 95 % half-width."""
    if value is None:
        return "—"
    if value.se is None:
        return f"{factor * value.value:.{digits}f}"
    return f"{factor * value.value:.{digits}f} ± {factor * Z_95 * value.se:.{digits}f}"


def _scale_bits(row: pd.Series) -> float | None:
    """Bits per quantized parameter spent on scales: absmax (+ nested absmax and offset with double quantization)."""
    columns = ("weights.load.quant_state.absmax_bytes", "weights.load.quant_state.nested_absmax_bytes", "weights.load.quant_state.offset_bytes")
    quantized = row.get("weights.load.quantized_params")
    if not quantized or any(pd.isna(row.get(c)) for c in columns):
        return None
    return 8 * sum(float(row[c]) for c in columns) / float(quantized)


def _code_table_bits(row: pd.Series) -> float:
    columns = ("weights.load.quant_state.code_table_bytes", "weights.load.quant_state.nested_code_table_bytes")
    return 8 * sum(float(row.get(c) or 0) for c in columns) / float(row["weights.load.quantized_params"])


def double_quantization_line(frame: pd.DataFrame) -> PaperLine:
    claim = "double quantization: quantization constants per parameter"
    paper = f"{PAPER_SCALE_BITS['plain']:.3f} → {PAPER_SCALE_BITS['double']:.3f} bit/param ({PAPER_SCALE_BITS['plain'] - PAPER_SCALE_BITS['double']:.3f} saved)"
    means = ok_means(frame)
    for plain, double in (("nf4", "nf4-dq"), ("fp4", "fp4-dq")):
        if plain in means.index and double in means.index:
            bits = {name: _scale_bits(means.loc[name]) for name in (plain, double)}
            if None in bits.values():
                continue
            tables = _code_table_bits(means.loc[double])
            measured = (
                f"{plain} {bits[plain]:.4f} → {double} {bits[double]:.4f} bit/param ({bits[plain] - bits[double]:.4f} saved); "
                f"bits per quantized parameter {means.loc[plain, 'weights.load.bits_per_quantized_param']:.4f} → "
                f"{means.loc[double, 'weights.load.bits_per_quantized_param']:.4f}, of which per-layer code tables "
                f"{tables:.4f} (the paper leaves them out)"
            )
            close = (abs(bits[plain] - PAPER_SCALE_BITS["plain"]) <= SCALE_BITS_TOLERANCE
                     and abs(bits[double] - PAPER_SCALE_BITS["double"]) <= SCALE_BITS_TOLERANCE)
            return PaperLine(claim, paper, measured + " (exact byte count)", AGREES if close else DISAGREES)
    return PaperLine(claim, paper, "needs nf4 and nf4-dq (or fp4 and fp4-dq) ok in the run", NOT_MEASURED)


def _quality_metric(frame: pd.DataFrame, phase: str) -> str | None:
    """The task's headline quality metric in `phase` (eval_before / eval_after), e.g. quality.eval_before.perplexity."""
    for candidate in fields.HEADLINE_QUALITY:
        if not candidate.startswith("quality.eval_after."):
            continue
        column = candidate.replace("quality.eval_after.", f"quality.{phase}.", 1)
        if column in frame.columns and frame[column].notna().any():
            return column
    return None


def _better_sign(metric: str) -> int:
    """+1 when higher is better (recall), -1 when lower is (perplexity)."""
    spec = fields.spec_for(metric)
    return 1 if spec is not None and spec.direction == "higher" else -1


def nf4_before_fp4_lines(frame: pd.DataFrame) -> list[PaperLine]:
    """NF4 against FP4 before fine-tuning: the paper's pair (NF4 with double quantization, FP4 without),
    then the pairs with the same double quantization setting on both sides, where the run has them."""
    metric = _quality_metric(frame, "eval_before")
    paper = f"Pile CC perplexity: NF4 + DQ {PAPER_PILE_CC['nf4-dq']:.2f} vs FP4 (E2M1) {PAPER_PILE_CC['fp4']:.2f}"
    if metric is None:
        return [PaperLine("NF4 better than FP4 before fine-tuning", paper, "no quality figure before fine-tuning (eval.before = false?)", NOT_MEASURED)]
    name = fields.label(metric)
    lines = []
    for nf4, fp4, claim in (
        ("nf4-dq", "fp4", "NF4 (+DQ) better than FP4 before fine-tuning"),
        ("nf4", "fp4", "the same, neither with double quantization"),
        ("nf4-dq", "fp4-dq", "the same, both with double quantization"),
    ):
        a, b = estimate(frame, nf4, metric), estimate(frame, fp4, metric)
        if a is None or b is None:
            if nf4 == "nf4-dq" and fp4 == "fp4":
                lines.append(PaperLine(claim, paper, f"needs nf4-dq and fp4 ok in the run with {name}", NOT_MEASURED))
            continue
        advantage = _better_sign(metric) * (a.value - b.value)
        factor, unit = fields.scale(metric)
        unit = " %" if unit == "%" else ""
        measured = f"{name}: {nf4} {_shown(a, 2, factor)}{unit} vs {fp4} {_shown(b, 2, factor)}{unit}"
        se = difference_se(a, b)
        paired = paired_estimate(frame, [(nf4, "eval_before"), (fp4, "eval_before")], lambda p: p[1] - p[0]) \
            if metric == "quality.eval_before.perplexity" else None
        if paired is not None:
            se = paired.se
            measured += f"; difference {paired.value:.2f} ± {Z_95 * paired.se:.2f}, paired over the same windows"
        lines.append(PaperLine(claim, paper if not lines else "", measured, judge(advantage, se)))
    return lines


# the unquantized arms the paper's "16-bit" is read as, the closest first (`dense` runs in the compute dtype)
UNQUANTIZED = ("bf16", "fp16", precisions.DENSE, "fp32")


def _unquantized(frame: pd.DataFrame) -> str | None:
    """The unquantized arm the 4-bit one is held against: the baseline precision when it is unquantized
    (`dense`, in whatever compute dtype it ran, included), else the first of UNQUANTIZED the run has."""
    baseline = stats.baseline_precision(frame)
    present = set(stats.ok_rows(frame).get("precision", pd.Series(dtype=str)))
    if baseline in UNQUANTIZED and baseline in present:
        return baseline
    return next((p for p in UNQUANTIZED if p in present), None)


def _dtype_of(frame: pd.DataFrame, precision: str) -> str:
    """"dense (bfloat16)": an arm whose name does not fix its dtype, with the dtype its records say it ran in."""
    known = precisions.REGISTRY.get(precision)
    if known is not None and known.dense_dtype:
        return precision
    rows = stats.ok_rows(frame)
    rows = rows[rows["precision"] == precision]
    for column in ("precision.dense_dtype", "weights.load.linears.dense_linear_dtypes", "config.compute_dtype"):
        if column in rows.columns and rows[column].notna().any():
            return f"{precision} ({rows[column].dropna().iloc[0]})"
    return precision


def recovery_line(frame: pd.DataFrame) -> PaperLine:
    """The 4-bit arm's gap to the 16-bit arm after fine-tuning against before: the claim holds when it shrank."""
    claim = "LoRA recovers 4-bit: gap to the unquantized base after fine-tuning vs before"
    paper = "after fine-tuning NF4 + DQ matches 16-bit (abstract; Table 4, MMLU of LLaMA 7B–65B)"
    before, after = _quality_metric(frame, "eval_before"), _quality_metric(frame, "eval_after")
    sixteen = _unquantized(frame)
    four = next((p for p in ("nf4-dq", "nf4") if p in set(stats.ok_rows(frame).get("precision", pd.Series(dtype=str)))), None)
    if before is None or after is None or sixteen is None or four is None:
        needs = [what for what, missing in (
            ("quality before fine-tuning (eval.before = true)", before is None),
            ("quality after fine-tuning (train.steps > 0)", after is None),
            ("an unquantized arm (dense, bf16, fp16 or fp32)", sixteen is None),
            ("nf4-dq or nf4", four is None),
        ) if missing]
        return PaperLine(claim, paper, "needs " + ", ".join(needs), NOT_MEASURED)
    gaps = {}
    for phase, metric in (("before", before), ("after", after)):
        a, b = estimate(frame, four, metric), estimate(frame, sixteen, metric)
        if a is None or b is None:
            return PaperLine(claim, paper, f"needs {four} and {sixteen} with {fields.label(metric)}", NOT_MEASURED)
        gaps[phase] = Estimate(a.value - b.value, difference_se(a, b))
    shrink = abs(gaps["before"].value) - abs(gaps["after"].value)
    shrink_se = difference_se(gaps["before"], gaps["after"])
    how = ""
    if before == "quality.eval_before.perplexity" and after == "quality.eval_after.perplexity":
        arms = [(four, "eval_before"), (sixteen, "eval_before"), (four, "eval_after"), (sixteen, "eval_after")]
        paired = {
            "before": paired_estimate(frame, arms, lambda p: p[0] - p[1]),
            "after": paired_estimate(frame, arms, lambda p: p[2] - p[3]),
            "shrink": paired_estimate(frame, arms, lambda p: np.abs(p[0] - p[1]) - np.abs(p[2] - p[3])),
        }
        if all(paired.values()):
            gaps = {"before": paired["before"], "after": paired["after"]}
            shrink_se, how = paired["shrink"].se, ", paired over the same windows"
    name = fields.label(before).removeprefix("before ")
    factor, unit = fields.scale(before)
    unit = " points" if unit == "%" else ""
    measured = (
        f"{name} gap {four} − {_dtype_of(frame, sixteen)}: before {_shown(gaps['before'], 2 if factor != 1 else 3, factor)}{unit}, "
        f"after {_shown(gaps['after'], 2 if factor != 1 else 3, factor)}{unit}{how}"
    )
    if gaps["after"].se is not None and abs(gaps["after"].value) <= Z_95 * gaps["after"].se:
        measured += " (after: no difference from zero the eval can detect)"
    return PaperLine(claim, paper, measured, judge(shrink, shrink_se))


def paper_lines(frame: pd.DataFrame) -> list[PaperLine]:
    """Every line of the section, in the paper's order; empty for an empty frame."""
    if frame.empty or "precision" not in frame.columns:
        return []
    return [double_quantization_line(frame), *nf4_before_fp4_lines(frame), recovery_line(frame)]


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    lines = paper_lines(frame)
    table = pd.DataFrame(
        [{"paper": line.paper, "qbench": line.qbench, "verdict": line.verdict} for line in lines],
        index=pd.Index([line.claim for line in lines], name="claim"),
    )
    return table


def _intro(frame: pd.DataFrame) -> str:
    parts = [
        f"{PAPER} against this run's figures. \"{NOISE}\" means the difference lies within "
        "the 95 % interval of the difference: a bootstrap paired over the same eval windows where the records "
        "keep each window's score, else the records' own intervals in quadrature, with the seeds' spread; "
        "\"no interval\" means the records carry neither."
    ]
    if "model.base_origin" in frame.columns and frame["model.base_origin"].notna().any():
        parts.append(f"The base here is {frame['model.base_origin'].dropna().iloc[0]}.")
    return " ".join(parts)


def paper_section(data: Any) -> Any:
    """The report section (qbench.analysis.report.sections.Section, key "paper"), or None when the frame has no precisions."""
    from qbench.analysis.report.sections import Section

    table = paper_table(data.frame)
    if table.empty:
        return None
    return Section("paper", TITLE, text=_intro(data.frame), table=table)
