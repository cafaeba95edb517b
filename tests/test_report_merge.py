"""The report's part on adapters (qbench.analysis.report.merge), from hand-made records."""

from __future__ import annotations

import pandas as pd

from qbench.analysis.report import merge
from qbench.analysis.report.sections import ReportData
from qbench.analysis.report.write import report_sections


def record(cell: str, unchanged: float | None, correlation: float | None, **extra) -> dict:
    found = {
        "cell_id": cell, "status": "ok", "precision": cell.split("-")[0], "seed": 0, "task": "causal_lm",
        "baseline_precision": "bf16", "quality.eval_after.perplexity": 17.5, "interval.eval_after.perplexity.low": 15.3,
        "interval.eval_after.perplexity.high": 20.0,
        "quality.merge_requantized.perplexity": 23.5, "interval.merge_requantized.perplexity.low": 20.5,
        "interval.merge_requantized.perplexity.high": 26.7, "merge.requantized.perplexity_delta": 5.94,
        "merge.requantized.perplexity_delta_low": 4.91, "merge.requantized.perplexity_delta_high": 6.99,
        "merge.requantized.perplexity_verdict": "worse", "merge.requantized.how": "peft's merge",
        "merge.requantized.unchanged_code_share": unchanged, "merge.requantized.delta_correlation": correlation,
        "merge.requantized.delta_rms_to_step": 0.0085,
    }
    return {**found, **extra}


def test_a_merge_that_kept_little_of_the_adapter_is_flagged_in_words_and_one_that_kept_it_is_not():
    frame = pd.DataFrame([record("nf4-seed0", 0.99998, 0.009), record("bf16-seed0", 0.12, 0.99), record("fp4-seed0", 1.0, None)])
    erased = merge.erased_merges(frame)
    assert len(erased) == 2
    assert erased[0].startswith("nf4-seed0: merging and re-quantizing erased most of the adapter — 99.998% of the stored codes")
    assert "correlates with the adapter's B·A at only 0.01" in erased[0] and "0.0085× the quantization step" in erased[0]
    assert erased[1].startswith("fp4-seed0") and "none of the adapter's change survived" in erased[1]
    section = merge.merge_section(ReportData(frame))
    assert section is not None and section.text.count("erased most of the adapter") == 2
    row = section.table.loc["nf4-seed0"]
    assert row["perplexity, merged and re-quantized [95 % interval]"] == "23.50 [20.50, 26.70]"
    assert row["Δ requantized − unmerged (perplexity) [95 % interval]"] == "+5.94 [+4.91, +6.99]"
    assert row["requantized vs unmerged"] == "worse" and row["codes unchanged by re-quantizing (%)"] == "100.0"


def test_a_report_without_merges_says_its_figures_are_the_unmerged_adapter_s():
    frame = pd.DataFrame([{k: v for k, v in record("nf4-seed0", 0.5, 0.5).items() if not k.startswith(("merge.", "quality.merged",
                                                                                                      "interval.merged"))}])
    keys = {s.key: s for s in report_sections(frame)}
    assert keys["merge"].text == merge.UNMERGED_NOTE


def test_the_init_section_appears_when_a_suite_sets_or_varies_the_init():
    plain = record("nf4-seed0", 0.5, 0.5, **{"config.lora.init": "kaiming", "lora_init.error_rel_overall": 0.094,
                                             "lora_init.plain_error_rel_overall": 0.094, "lora_init.recovered_share": 0.0})
    assert merge.init_section(ReportData(pd.DataFrame([plain]))) is None
    pissa = {**plain, "cell_id": "nf4-pissa-seed0", "config.lora.init": "pissa", "lora_init.error_rel_overall": 0.06,
             "lora_init.recovered_share": 1 - 0.06 / 0.094}
    section = merge.init_section(ReportData(pd.DataFrame([plain, pissa])))
    assert section.table.loc["nf4-pissa-seed0", "‖W − (Q + B·A)‖/‖W‖ before training (%)"] == "6.00"
    assert section.table.loc["nf4-pissa-seed0", "recovered (%)"] == "36.17"
    assert section.table.loc["nf4-seed0", "init"] == "kaiming"
