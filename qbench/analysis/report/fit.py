"""A fit's answer (fit.json, qbench.runner.fit) as tables and a plot.

- answers: per arm and axis, the largest value that trained within the budget, the throughput at that value
  (from its trial), and the quality of the arm at the suite's own settings (its run after the searches);
- trials: every trial's estimate beside its measurement and their error, with why that value was tried.

    write(result, folder) -> fit.md, fit.csv, fit-trials.csv, plots/fit.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from qbench.analysis.report.plots import colours_for, png, pyplot
from qbench.contract import fields, sizes
from qbench.contract.files import write_bytes_atomic, write_text_atomic

MIB = 1024 * 1024
OUTCOMES = {
    "found": "the largest value that fits; the next one up did not",
    "all fit": "every value of the range fits: the answer is at least the range's end",
    "none fit": "not even the range's smallest value fits",
    "refused": "refused before any trial: the exact parts alone exceed the limit",
    "failed": "a trial could not be judged (it failed for another reason)",
}


def _answer_trial(search: dict[str, Any]) -> dict[str, Any] | None:
    return next((t for t in search["trials"] if t["value"] == search["largest"]), None)


def _quality_column(result: dict[str, Any]) -> str | None:
    frame = pd.DataFrame(list(result.get("quality", {}).values()))
    return fields.first_present(frame, fields.HEADLINE_QUALITY) if not frame.empty else None


def answers(result: dict[str, Any]) -> pd.DataFrame:
    """One row per arm and axis: the answer, its peak, throughput, effective batch and the arm's quality."""
    settings = result["suite_settings"]
    metric = _quality_column(result)
    rows = []
    for search in result["searches"]:
        at = _answer_trial(search)
        batch = search["largest"] if search["axis"] == "batch_size" else search["settings"].get("batch_size")
        quality = result.get("quality", {}).get(search["arm"], {})
        rows.append({
            "arm": search["arm"],
            "precision": search["precision"],
            "axis": search["axis"],
            "largest that fits": search["largest"],
            "next tried (over)": search["smallest_over"],
            "outcome": search["outcome"],
            "peak at answer MiB": at["measured"] / MIB if at and at["measured"] is not None else None,
            "estimate error at answer %": 100 * at["error"] if at and at["error"] is not None else None,
            "samples/s at answer": (at or {}).get("speed", {}).get("train_samples_per_s"),
            "tokens/s at answer": (at or {}).get("speed", {}).get("train_tokens_per_s"),
            "samples per CPU s at answer": (at or {}).get("speed", {}).get("train_samples_per_cpu_s"),
            "effective batch": batch * settings["grad_accum"] if batch else None,
            "trials": len(search["trials"]),
            "most trials": search["max_trials"],
            **({f"{fields.label(metric)} (suite's settings)": quality.get(metric)} if metric else {}),
            "note": search["reason"],
        })
    return pd.DataFrame(rows)


def trials(result: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: the value, why it was tried, the estimate, the measurement and the error."""
    rows = []
    for search in result["searches"]:
        for number, trial in enumerate(search["trials"], 1):
            estimate = trial["estimate"]
            rows.append({
                "arm": search["arm"], "axis": search["axis"], "trial": number, "value": trial["value"], "how": trial["how"],
                "estimate MiB": estimate["peak"] / MIB, "estimated phase": estimate["phase"],
                "measured MiB": trial["measured"] / MIB if trial["measured"] is not None else None,
                "error %": 100 * trial["error"] if trial["error"] is not None else None,
                "estimate bytes": estimate["peak"], "measured bytes": trial["measured"],
                "fits": trial["fits"], "status": trial["status"],
            })
    return pd.DataFrame(rows)


def plot(result: dict[str, Any]) -> bytes | None:
    """One panel per axis: the largest value per arm (bars), with its throughput and the arm's quality at the
    suite's own settings written on each bar."""
    searches = [s for s in result["searches"] if s["largest"] is not None]
    if not searches:
        return None
    axes_names = list(dict.fromkeys(s["axis"] for s in searches))
    plt = pyplot()
    figure, panels = plt.subplots(1, len(axes_names), figsize=(5.5 * len(axes_names), 4.0), squeeze=False)
    colours = colours_for(list(dict.fromkeys(s["precision"] for s in result["searches"])))
    metric = _quality_column(result)
    for panel, axis in zip(panels[0], axes_names, strict=True):
        chosen = [s for s in searches if s["axis"] == axis]
        names = [s["arm"] for s in chosen]
        values = [s["largest"] for s in chosen]
        bars = panel.bar(names, values, color=[colours[s["precision"]] for s in chosen])
        unit = "samples/s" if axis == "batch_size" else "tokens/s"
        for bar, search in zip(bars, chosen, strict=True):
            at = _answer_trial(search) or {}
            speed = at.get("speed", {}).get("train_samples_per_s" if axis == "batch_size" else "train_tokens_per_s")
            label = f"{search['largest']}" + ("+" if search["outcome"] == "all fit" else "")
            label += f"\n{speed:,.0f} {unit}" if speed else ""
            quality = result.get("quality", {}).get(search["arm"], {}).get(metric) if metric else None
            label += f"\n{fields.label(metric)} {quality:.4g}" if quality is not None else ""
            panel.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        panel.set_ylabel(f"largest {axis} within budget")
        panel.set_title(f"{axis} within {result['budget_bytes']:,} B ({sizes.label(result['budget_bytes'])}), {result['device']}",
                        fontsize=10)
        panel.set_ylim(0, max(values) * 1.25)
        panel.tick_params(axis="x", labelrotation=30)
    return png(figure)


def _table(frame: pd.DataFrame, floatfmt: str = ",.2f") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt) if not frame.empty else "(none)"


def markdown(result: dict[str, Any]) -> str:
    """fit.md: the question, the answer table, what the figure judged is, and every trial."""
    shown = answers(result).drop(columns=["note"])
    notes = answers(result)[["arm", "axis", "outcome", "note"]]
    notes = notes[notes["outcome"] != "found"]
    missing = [f"The estimate for {axis} was unavailable ({found['unavailable']}): its searches learned from their "
               "trials alone, and their errors say so." for axis, found in result.get("estimate", {}).items()
               if found.get("unavailable")]
    lines = [
        f"# What fits: {result['suite']} within {sizes.label(result['budget_bytes'])}",
        "",
        *[line for text in missing for line in (text, "")],
        f"Budget {result['budget_bytes']:,} bytes ({result['budget_source']}), margin {result['margin']:g}: a value fits "
        f"when its trial's peak is at most {result['limit_bytes']:,} bytes. Device {result['device']}, computing in "
        f"{result['compute_dtype']}. Each trial is one fresh cell of {result['trial_steps']} optimizer steps with the "
        "suite's evaluation.",
        "",
        f"The figure judged: {result['judged']}.",
        "",
        f"Gradient accumulation is the suite's ({result['suite_settings']['grad_accum']}) in every trial: the effective "
        "batch is batch_size x grad_accum. Throughput is from the trial at the answer; quality from one run of each arm "
        "at the suite's own settings.",
        "",
        "## Largest value per arm",
        "",
        _table(shown, ",.3f"),
        "",
        *([_table(notes), ""] if not notes.empty else []),
        "## Every trial: estimate beside measurement",
        "",
        "Error = (estimate - measured) / measured. `how`: estimate (the first trial, where the estimate says the "
        "limit is), exponential (before a bracket), bisection (inside it).",
        "",
        _table(trials(result).drop(columns=["estimate MiB", "measured MiB"]), ",.3f"),
    ]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], folder: Path | str) -> dict[str, Path]:
    """fit.md, fit.csv (the answers), fit-trials.csv and plots/fit.png into `folder`."""
    folder = Path(folder)
    paths = {"markdown": folder / "fit.md", "csv": folder / "fit.csv", "trials_csv": folder / "fit-trials.csv"}
    # each file whole or not at all (a full disk leaves the previous version, never half a table)
    write_text_atomic(paths["markdown"], markdown(result))
    write_text_atomic(paths["csv"], answers(result).to_csv(index=False))
    write_text_atomic(paths["trials_csv"], trials(result).to_csv(index=False))
    figure = plot(result)
    if figure is not None:
        (folder / "plots").mkdir(exist_ok=True)
        paths["plot"] = folder / "plots" / "fit.png"
        write_bytes_atomic(paths["plot"], figure)
    return paths
