"""The QLoRA paper's lines next to qbench's figures: each verdict from exact bytes or from the records' intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from qbench.analysis.report import paper
from qbench.analysis.report.write import write_report

from .records import make_record

LAYERS = [(576, 576)] * 4 + [(192, 576)] * 4 + [(1536, 576)] * 6  # (out, in) of each quantized linear


def _state_bytes(double_quant: bool) -> dict[str, int]:
    """What bitsandbytes stores beside 4-bit codes for LAYERS, blocks of 64 (absmax float32, or uint8 with
    a float32 absmax per 256 blocks, a 256-entry code table and a float32 offset per layer)."""
    absmax = nested = nested_code = offset = 0
    for out, inp in LAYERS:
        blocks = out * inp // 64
        if double_quant:
            absmax += blocks
            nested += math.ceil(blocks / 256) * 4
            nested_code += 256 * 4
            offset += 4
        else:
            absmax += blocks * 4
    return {"weights.load.quant_state.absmax_bytes": absmax, "weights.load.quant_state.nested_absmax_bytes": nested,
            "weights.load.quant_state.nested_code_table_bytes": nested_code, "weights.load.quant_state.offset_bytes": offset,
            "weights.load.quant_state.code_table_bytes": 16 * 4 * len(LAYERS)}


def lm_record(precision: str, before: float, after: float | None = None, se: float | None = None, seed: int = 0,
              **extra) -> dict:
    record = make_record("bf16", seed, task="causal_lm", model="builtin:smollm2-135m")
    record.update(precision=precision, cell_id=f"{precision}-seed{seed}")
    for key in [k for k in record if k.startswith("quality.")]:
        del record[key]
    quantized = sum(o * i for o, i in LAYERS)
    if precision not in ("bf16", "fp16", "fp32"):
        state = _state_bytes(precision.endswith("-dq"))
        record.update(state)
        record["weights.load.quantized_params"] = quantized
        record["weights.load.bits_per_quantized_param"] = 4 + 8 * sum(state.values()) / quantized
    else:
        record["weights.load.quantized_params"] = 0
    record["quality.eval_before.perplexity"] = before
    record["quality.eval_after.perplexity"] = after
    if se is not None:
        record["interval.eval_before.perplexity.se"] = se
        record["interval.eval_after.perplexity.se"] = se if after is not None else None
    record.update({key.replace("__", "."): value for key, value in extra.items()})
    return record


def lines_of(records: list[dict]) -> dict[str, paper.PaperLine]:
    return {line.claim: line for line in paper.paper_lines(pd.DataFrame(records))}


DQ = "double quantization: quantization constants per parameter"
ORDER = "NF4 (+DQ) better than FP4 before fine-tuning"
RECOVERY = "LoRA recovers 4-bit: gap to the unquantized base after fine-tuning vs before"


def test_double_quantization_agrees_with_the_papers_bits_from_exact_bytes():
    line = lines_of([lm_record("nf4", 20), lm_record("nf4-dq", 20)])[DQ]
    assert line.verdict == "agrees"
    assert "nf4 0.5000 → nf4-dq 0.1270 bit/param (0.3730 saved)" in line.qbench
    assert "0.500 → 0.127 bit/param (0.373 saved)" == line.paper


def test_double_quantization_disagrees_when_the_constants_take_other_room():
    fp16_absmax = lm_record("nf4", 20)
    fp16_absmax["weights.load.quant_state.absmax_bytes"] //= 2  # 16-bit constants: 0.25 bit/param
    assert lines_of([fp16_absmax, lm_record("nf4-dq", 20)])[DQ].verdict == "disagrees"


def test_double_quantization_says_what_it_needs_without_both_arms():
    line = lines_of([lm_record("nf4-dq", 20), lm_record("fp4", 30)])[DQ]
    assert line.verdict == "not measured" and "nf4 and nf4-dq" in line.qbench


@pytest.mark.parametrize(
    ("fp4", "verdict"),
    [(30.0, "agrees"), (24.5, "no difference the eval can detect"), (18.0, "disagrees")],
)
def test_nf4_against_fp4_is_judged_by_the_interval_of_the_difference(fp4: float, verdict: str):
    # nf4-dq 23.5 and fp4 each ± se 0.8: the difference's 95 % half-width is 1.96 * 0.8 * sqrt 2 = 2.2
    line = lines_of([lm_record("nf4-dq", 23.5, se=0.8), lm_record("fp4", fp4, se=0.8)])[ORDER]
    assert line.verdict == verdict
    assert "27.41" in line.paper and "31.07" in line.paper
    assert "nf4-dq 23.50 ± 1.57 vs fp4" in line.qbench


def test_without_intervals_the_verdict_says_so():
    line = lines_of([lm_record("nf4-dq", 23.5), lm_record("fp4", 23.6)])[ORDER]
    assert line.verdict == "agrees (no interval)"


def test_an_interval_given_only_as_bounds_is_used():
    records = [lm_record("nf4-dq", 23.5), lm_record("fp4", 24.0)]
    for record in records:
        record["interval.eval_before.perplexity.low"] = record["quality.eval_before.perplexity"] - 2.0
        record["interval.eval_before.perplexity.high"] = record["quality.eval_before.perplexity"] + 2.0
    assert lines_of(records)[ORDER].verdict == "no difference the eval can detect"


def test_seeds_spread_adds_to_the_noise():
    steady = [lm_record("nf4-dq", 23.5, se=0.1, seed=s) for s in (0, 1)] + [lm_record("fp4", 25.0, se=0.1, seed=s) for s in (0, 1)]
    assert lines_of(steady)[ORDER].verdict == "agrees"
    spread = [lm_record("nf4-dq", v, se=0.1, seed=s) for s, v in ((0, 20.0), (1, 27.0))]
    spread += [lm_record("fp4", v, se=0.1, seed=s) for s, v in ((0, 22.0), (1, 28.0))]
    assert lines_of(spread)[ORDER].verdict == "no difference the eval can detect"


def test_same_dq_pairs_are_shown_when_the_run_has_them():
    lines = paper.paper_lines(pd.DataFrame([lm_record(p, v, se=0.2) for p, v in
                                            (("nf4", 23.0), ("nf4-dq", 23.5), ("fp4", 30.0), ("fp4-dq", 30.5))]))
    claims = [line.claim for line in lines]
    assert claims[1:4] == [ORDER, "the same, neither with double quantization", "the same, both with double quantization"]
    assert all(line.verdict == "agrees" for line in lines[1:4])


@pytest.mark.parametrize(
    ("nf4_after", "verdict"),
    [(15.3, "agrees"), (18.3, "no difference the eval can detect"), (21.0, "disagrees")],
)
def test_recovery_compares_the_gap_to_16_bit_after_fine_tuning_with_the_gap_before(nf4_after: float, verdict: str):
    records = [lm_record("bf16", 20.0, 15.0, se=0.5), lm_record("nf4-dq", 23.5, nf4_after, se=0.5)]
    line = lines_of(records)[RECOVERY]
    assert line.verdict == verdict
    assert "before +3.500" in line.qbench or "before 3.500" in line.qbench
    if verdict == "agrees":
        assert "after: no difference from zero the eval can detect" in line.qbench


def test_recovery_without_training_says_what_it_needs():
    line = lines_of([lm_record("bf16", 20.0), lm_record("nf4-dq", 23.5)])[RECOVERY]
    assert line.verdict == "not measured" and "train.steps > 0" in line.qbench


def test_clip_runs_use_recall_where_higher_is_better():
    records = [make_record(p, **{"quality.eval_before.mean_recall@1": r}) for p, r in (("bf16", 0.6), ("nf4-dq", 0.58))]
    fp4 = make_record("nf4-dq", **{"quality.eval_before.mean_recall@1": 0.50})
    fp4.update(precision="fp4", cell_id="fp4-seed0")
    line = lines_of([*records, fp4])[ORDER]
    assert line.verdict == "agrees (no interval)" and "recall" in line.qbench


def test_report_has_the_section_in_markdown_and_html(tmp_path: Path):
    records = [lm_record("bf16", 20.0, 15.0, se=0.5), lm_record("nf4", 23.0, 15.5, se=0.5),
               lm_record("nf4-dq", 23.5, 15.4, se=0.5), lm_record("fp4", 30.0, 16.0, se=0.5),
               lm_record("fp4-dq", 31.0, 16.1, se=0.5)]
    records[0]["model.base_origin"] = "a bf16 copy of a <Q4_1> GGUF"
    paths = write_report(pd.DataFrame(records), tmp_path)
    markdown = paths["markdown"].read_text()
    assert "## The QLoRA paper side by side" in markdown
    assert markdown.count(" agrees |") >= 4 and "a bf16 copy of a <Q4_1> GGUF" in markdown
    page = paths["html"].read_text()
    assert "The QLoRA paper side by side" in page and "&lt;Q4_1&gt;" in page and "<Q4_1>" not in page


def _windowed(precision: str, nll_per_token, tokens, se: float, seed: int = 0, after=None) -> dict:
    """A record whose perplexity comes from per-window scores (as a causal-LM cell writes them)."""
    import numpy as np

    nll_per_token, tokens = np.asarray(nll_per_token, dtype=float), np.asarray(tokens, dtype=float)
    sums = (nll_per_token * tokens).tolist()
    record = lm_record(precision, math.exp(sum(sums) / tokens.sum()), se=se, seed=seed)
    record.update({"per_window.eval_before.window_nll": sums, "per_window.scored_tokens": tokens.astype(int).tolist(),
                   "data.sha256": "abc", "eval.protocol": "p"})
    if after is not None:
        after_sums = (np.asarray(after, dtype=float) * tokens).tolist()
        record.update({"per_window.eval_after.window_nll": after_sums,
                       "quality.eval_after.perplexity": math.exp(sum(after_sums) / tokens.sum()),
                       "interval.eval_after.perplexity.se": se})
    return record


def _difficulty(count: int = 64):
    import numpy as np

    return np.random.default_rng(1).uniform(2.0, 4.0, count)  # nats per token: windows differ a lot


def test_paired_windows_separate_arms_whose_own_intervals_overlap():
    text = _difficulty()
    tokens = [128] * len(text)
    # fp4 is worse on every window by 0.05 nats/token; each arm's own interval is wide (the text's spread)
    records = [_windowed("nf4-dq", text, tokens, se=2.0), _windowed("fp4", text + 0.05, tokens, se=2.0)]
    line = lines_of(records)[ORDER]
    assert line.verdict == "agrees" and "paired over the same windows" in line.qbench
    for record in records:  # the same figures without per-window scores: the quadrature of two wide intervals
        del record["per_window.eval_before.window_nll"]
    assert lines_of(records)[ORDER].verdict == "no difference the eval can detect"


def test_arms_on_different_windows_are_not_paired():
    text = _difficulty()
    other = _windowed("fp4", text + 0.05, [128] * (len(text) - 1) + [64], se=2.0)
    line = lines_of([_windowed("nf4-dq", text, [128] * len(text), se=2.0), other])[ORDER]
    assert "paired" not in line.qbench and line.verdict == "no difference the eval can detect"


def test_paired_difference_is_the_difference_of_the_figures():
    text = _difficulty()
    records = [_windowed("nf4-dq", text, [100] * len(text), se=1.0), _windowed("fp4", text + 0.1, [100] * len(text), se=1.0)]
    paired = paper.paired_estimate(pd.DataFrame(records), [("nf4-dq", "eval_before"), ("fp4", "eval_before")], lambda p: p[1] - p[0])
    with pytest.raises(ValueError, match="phase before"):  # a schema-2 phase name is refused, not read as "no scores"
        paper.paired_estimate(pd.DataFrame(records), [("nf4-dq", "before"), ("fp4", "before")], lambda p: p[1] - p[0])
    assert paired.value == pytest.approx(records[1]["quality.eval_before.perplexity"] - records[0]["quality.eval_before.perplexity"])
    assert 0 < paired.se < 0.5


def test_recovery_is_paired_over_windows_when_it_can_be():
    text = _difficulty()
    tokens = [128] * len(text)
    records = [_windowed("bf16", text, tokens, se=2.0, after=text - 0.3),
               _windowed("nf4-dq", text + 0.2, tokens, se=2.0, after=text - 0.29)]
    line = lines_of(records)[RECOVERY]
    assert line.verdict == "agrees" and "paired over the same windows" in line.qbench
