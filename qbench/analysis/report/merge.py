"""The report's part on adapters: how each cell's LoRA init started against its quantized base, and what merging the
trained adapter into the base did to quality (and, for a re-quantizing merge, how much of the adapter survived).

A merge is said to have erased most of the adapter when the weight change it kept correlates with the intended
B·A at less than ERASED_CORRELATION (less than a quarter of its variance explained) or not at all: the rest of
what it changed is rounding noise of the quantization grid. Figures are per cell, as recorded.
"""

from __future__ import annotations

import pandas as pd

from qbench.analysis import stats
from qbench.analysis.report.sections import ReportData, Section
from qbench.analysis.report.tables import HIGH, LOW
from qbench.contract import fields

ERASED_CORRELATION = 0.5
MERGES = {"dequantized": "merged into a dequantized copy", "requantized": "merged and re-quantized"}
UNMERGED_NOTE = ("Every quality figure of this report is the adapter's attached to its base unmerged: no cell merged it "
                 "(a suite asks with eval.after_merge).")


def _metric(frame: pd.DataFrame) -> str | None:
    """The headline metric's name (`perplexity`, `mean_recall@1`) the merges were judged on."""
    for name in ("mean_recall@1", "perplexity", "bits_per_byte"):
        if f"merge.requantized.{name}_verdict" in frame.columns or f"merge.dequantized.{name}_verdict" in frame.columns:
            return name
    return None


def _number(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce") if column in frame.columns else pd.Series(float("nan"), index=frame.index)


def merge_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ok cell: the unmerged figure, each merged figure with its interval, the difference (paired interval) and
    its verdict; for a re-quantizing merge the share of codes left unchanged, the correlation of the kept change
    with B·A and the delta's RMS over the quantization step."""
    ok = stats.ok_rows(frame)
    name = _metric(ok)
    if name is None or ok.empty:
        return pd.DataFrame()
    factor, unit = fields.scale(f"quality.eval_after.{name}")
    shown = name.replace("_", " ")
    phase = "eval_after" if f"quality.eval_after.{name}" in ok.columns and ok[f"quality.eval_after.{name}"].notna().any() else "eval_before"
    table = pd.DataFrame(index=pd.Index(ok["cell_id"].to_numpy(), name="cell"))
    unmerged = fields.headed(f"{shown}, unmerged", unit)
    table[unmerged] = (_number(ok, f"quality.{phase}.{name}") * factor).to_numpy()
    table[unmerged + LOW] = (_number(ok, f"interval.{phase}.{name}.low") * factor).to_numpy()
    table[unmerged + HIGH] = (_number(ok, f"interval.{phase}.{name}.high") * factor).to_numpy()
    for which, words in MERGES.items():
        if f"quality.merge_{which}.{name}" not in ok.columns:
            continue
        head = fields.headed(f"{shown}, {words}", unit)
        table[head] = (_number(ok, f"quality.merge_{which}.{name}") * factor).to_numpy()
        table[head + LOW] = (_number(ok, f"interval.merge_{which}.{name}.low") * factor).to_numpy()
        table[head + HIGH] = (_number(ok, f"interval.merge_{which}.{name}.high") * factor).to_numpy()
        delta = fields.headed(f"Δ {which} − unmerged", unit)
        table[delta] = (_number(ok, f"merge.{which}.{name}_delta") * factor).to_numpy()
        table[delta + LOW] = (_number(ok, f"merge.{which}.{name}_delta_low") * factor).to_numpy()
        table[delta + HIGH] = (_number(ok, f"merge.{which}.{name}_delta_high") * factor).to_numpy()
        table[f"{which} vs unmerged"] = ok.get(f"merge.{which}.{name}_verdict", pd.Series(None, index=ok.index)).to_numpy()
    if "merge.requantized.unchanged_code_share" in ok.columns:
        table["codes unchanged by re-quantizing (%)"] = (_number(ok, "merge.requantized.unchanged_code_share") * 100).to_numpy()
        table["kept change ~ B·A (correlation)"] = _number(ok, "merge.requantized.delta_correlation").to_numpy()
        table["B·A RMS / quantization step"] = _number(ok, "merge.requantized.delta_rms_to_step").to_numpy()
    return table


def erased_merges(frame: pd.DataFrame) -> list[str]:
    """One sentence per ok cell whose re-quantizing merge erased most of its adapter."""
    found = []
    for _, row in stats.ok_rows(frame).iterrows():
        unchanged = row.get("merge.requantized.unchanged_code_share")
        if unchanged is None or pd.isna(unchanged):
            continue
        correlation, ratio = row.get("merge.requantized.delta_correlation"), row.get("merge.requantized.delta_rms_to_step")
        if correlation is not None and not pd.isna(correlation) and correlation >= ERASED_CORRELATION:
            continue
        kept = ("none of the adapter's change survived" if correlation is None or pd.isna(correlation)
                else f"the weight change it kept correlates with the adapter's B·A at only {correlation:.2f}")
        step = f"; B·A's RMS is {ratio:.2g}× the quantization step" if ratio is not None and not pd.isna(ratio) else ""
        share = f"{unchanged:.3%}" if unchanged > 0.999 else f"{unchanged:.1%}"  # "100.0 %" would say no code changed
        found.append(f"{row['cell_id']}: merging and re-quantizing erased most of the adapter — {share} of the "
                     f"stored codes came back unchanged and {kept}{step}. Ship the adapter unmerged, or merge into the "
                     "dequantized base.")
    return found


def merge_section(data: ReportData) -> Section | None:
    """The merged evaluations against the unmerged adapter, and the merges that erased most of it, in words."""
    frame = data.frame
    if frame.empty or "cell_id" not in frame.columns:
        return None
    table = merge_table(frame)
    if table.empty:
        return Section("merge", "Merged adapters", text=UNMERGED_NOTE)
    erased = erased_merges(frame)
    how = [f"- {words}: {text}" for which, words in MERGES.items() if f"merge.{which}.how" in frame.columns
           for text in frame[f"merge.{which}.how"].dropna().unique()]
    text = "\n".join([f"- **{line}**" for line in erased] + how)
    note = ("Δ: the merged model's figure minus the unmerged adapter's on the same eval set, with the interval of the "
            "difference (paired over the eval windows where the task records them). Codes unchanged: stored 4-bit / 8-bit "
            "codes (a dense base: its values) that the re-quantizing merge left as they were; correlation: of the weight "
            "change that survived with the intended B·A.")
    return Section("merge", "Merged adapters: what shipping the merged model costs", text=text,
                   table=data.display(table, {c: 1 if "(%)" in c else 3 if "correlation" in c else 4 if "step" in c else 2
                                              for c in table.columns}),
                   note=note, wide=True)


def init_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ok cell with an initial error: its init, DoRA, the initial error ‖W − (Q + B·A)‖/‖W‖ against the plain
    quantized base's ‖W − Q‖/‖W‖, and the share of that the init recovered."""
    ok = stats.ok_rows(frame)
    if "lora_init.error_rel_overall" not in ok.columns or ok["lora_init.error_rel_overall"].isna().all():
        return pd.DataFrame()
    table = pd.DataFrame(index=pd.Index(ok["cell_id"].to_numpy(), name="cell"))
    table["init"] = ok.get("config.lora.init", pd.Series("kaiming", index=ok.index)).fillna("kaiming").to_numpy()
    table["DoRA"] = ok.get("config.lora.use_dora", pd.Series(False, index=ok.index)).map(lambda v: "yes" if v is True else "no").to_numpy()
    table["‖W − (Q + B·A)‖/‖W‖ before training (%)"] = (_number(ok, "lora_init.error_rel_overall") * 100).to_numpy()
    table["‖W − Q‖/‖W‖, plain (%)"] = (_number(ok, "lora_init.plain_error_rel_overall") * 100).to_numpy()
    table["recovered (%)"] = (_number(ok, "lora_init.recovered_share") * 100).to_numpy()
    return table


def init_section(data: ReportData) -> Section | None:
    """How far each initialised adapter on its base is from the checkpoint, when a suite varies or sets the init."""
    frame = data.frame
    inits = frame["config.lora.init"].dropna().unique() if "config.lora.init" in frame.columns else []
    dora = "config.lora.use_dora" in frame.columns and frame["config.lora.use_dora"].map(lambda v: v is True).any()
    if not (len(inits) > 1 or any(i != "kaiming" for i in inits) or dora):
        return None
    table = init_table(frame)
    if table.empty:
        return None
    note = ("Over the LoRA layers, before any step: W the checkpoint's weights, Q the base as this cell stores it, B·A "
            "the scaled adapter as initialised (DoRA's magnitudes included). Plain: the checkpoint stored in the cell's "
            "precision with B·A = 0. Recovered: 1 − initial / plain (negative: further from W than the plain base).")
    return Section("lora_init", "LoRA initialisation: how much of the quantization error it recovers",
                   table=data.display(table, 2), note=note)
