"""The gate's history: every gate run's figures in one SQLite file, each figure over commits, and its steps.

A store holds one row per gate run (`gate_runs`: when, which commit and baseline commit, which machine, the
verdict, how long it took) and one row per figure of it (`figures`: arm, figure, the new side's value, the
baseline side's where there is one, how many samples, the verdict). SQLite, because a store only grows by one
gate run at a time, must survive a job killed half-way (a transaction) and be read by any tool.

Steps: a figure's values over the gate runs of one machine are cut into segments by a change-point search
(ruptures' PELT, l2 cost, with a penalty from the series' own noise), and a cut whose level changes by more
than `min_change` of the level before it is a step; the run and commit it starts at are named.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA = """
CREATE TABLE IF NOT EXISTS gate_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    date TEXT NOT NULL,
    suite TEXT,
    git_commit TEXT,
    baseline_commit TEXT,
    machine TEXT,
    machine_description TEXT,
    hostname TEXT,
    verdict TEXT,
    exit_code INTEGER,
    seconds REAL,
    label TEXT
);
CREATE TABLE IF NOT EXISTS figures (
    run INTEGER NOT NULL REFERENCES gate_runs(id),
    arm TEXT NOT NULL,
    figure TEXT NOT NULL,
    value REAL,
    baseline REAL,
    samples INTEGER,
    verdict TEXT
);
"""
# the figures `qbench history` shows when none are named: speed against the baseline's code, speed, memory, quality
MAIN_FIGURES = ("speed.step_unqueued_time_p50_s.ratio", "speed.step_unqueued_time_p50_s",
                "memory.all_phases.pss_peak_bytes", "quality.eval_after.mean_recall@1", "quality.eval_after.perplexity")
RATIO_SUFFIX = ".ratio"  # a speed figure's new-over-baseline ratio of the medians, measured in the same gate run


def machine_fingerprint(frame: pd.DataFrame) -> tuple[str, str]:
    """(a short hash, its description) of what makes speed figures comparable: device, CPU or GPU model, the CPU
    kernels torch picks, the cores and torch threads, torch's version (not the host's name: CI machines of one
    kind share a history)."""
    parts = []
    for column in ("env.device", "env.device_name", "env.cpu_model", "env.torch_cpu_capability", "env.cpu_cores_available",
                   "env.torch_threads", "env.torch_version"):
        if column in frame.columns and frame[column].notna().any():
            value = frame[column].dropna().iloc[0]
            parts.append(f"{column.removeprefix('env.')}={value}")
    description = ", ".join(parts)
    return hashlib.sha256(description.encode()).hexdigest()[:12], description


@dataclass(frozen=True)
class GateRun:
    """One gate run as the store keeps it."""

    suite: str | None
    git_commit: str | None
    baseline_commit: str | None
    machine: str
    machine_description: str
    hostname: str | None
    verdict: str
    exit_code: int
    seconds: float | None
    label: str | None = None
    date: str = ""


def _connect(store: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(store, timeout=30)
    connection.executescript(SCHEMA)
    return connection


def figure_rows(checks: pd.DataFrame) -> list[tuple[str, str, float | None, float | None, int | None, str | None]]:
    """(arm, figure, value, baseline value, samples, verdict) of every numeric check: the new side's value; a speed
    check also gives its new-over-baseline ratio as `<figure>.ratio`."""
    rows = []
    for _, check in checks.iterrows():
        value = _number(check.get("new"))
        if value is None:
            continue
        samples = _number(check.get("n_new"))
        arm = str(check.get("arm", check.get("precision")))
        verdict = check.get("verdict")
        rows.append((arm, str(check["metric"]), value, _number(check.get("baseline")), int(samples) if samples is not None else None, verdict))
        if check.get("kind") == "speed" and _number(check.get("ratio")) is not None:
            rows.append((arm, str(check["metric"]) + RATIO_SUFFIX, _number(check.get("ratio")), 1.0,
                         int(samples) if samples is not None else None, verdict))
    return rows


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def append(store: Path | str, run: GateRun, checks: pd.DataFrame) -> int:
    """Add one gate run and its figures to `store` (made, with its folder, when missing), in one transaction;
    returns the run's id."""
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    date = run.date or datetime.now(UTC).isoformat(timespec="seconds")
    with _connect(store) as connection:
        cursor = connection.execute(
            "INSERT INTO gate_runs (date, suite, git_commit, baseline_commit, machine, machine_description, hostname, verdict, "
            "exit_code, seconds, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (date, run.suite, run.git_commit, run.baseline_commit, run.machine, run.machine_description, run.hostname,
             run.verdict, run.exit_code, run.seconds, run.label))
        run_id = int(cursor.lastrowid)
        connection.executemany("INSERT INTO figures (run, arm, figure, value, baseline, samples, verdict) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(run_id, *row) for row in figure_rows(checks)])
    return run_id


class HistoryError(RuntimeError):
    """The store cannot be read (not there, not a store)."""


def read(store: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(gate runs, figures) of `store`; HistoryError when it is missing or not a history store."""
    store = Path(store)
    if not store.is_file():
        raise HistoryError(f"{store}: no history store there (qbench gate --history {store} makes one)")
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
            runs = pd.read_sql_query("SELECT * FROM gate_runs ORDER BY id", connection)
            figures = pd.read_sql_query("SELECT * FROM figures", connection)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as error:
        raise HistoryError(f"{store}: not a qbench history store ({error})") from None
    return runs, figures


@dataclass(frozen=True)
class Step:
    """A step change of one figure: the first gate run at the new level (its id, commit), the levels and change."""

    arm: str
    figure: str
    machine: str
    run: int
    commit: str | None
    before: float
    after: float

    @property
    def change(self) -> float:
        return (self.after - self.before) / abs(self.before) if self.before else float("inf")


def series(runs: pd.DataFrame, figures: pd.DataFrame, patterns: tuple[str, ...] = MAIN_FIGURES,
           last: int | None = None) -> pd.DataFrame:
    """One row per (machine, arm, figure) matching `patterns`, one column per gate run (by id, oldest first)."""
    chosen = runs.tail(last) if last else runs
    wanted = figures[figures["run"].isin(chosen["id"]) & figures["figure"].map(lambda f: any(fnmatchcase(f, p) for p in patterns))]
    if wanted.empty:
        return pd.DataFrame()
    wanted = wanted.merge(chosen[["id", "machine"]], left_on="run", right_on="id")
    table = wanted.pivot_table(index=["machine", "arm", "figure"], columns="run", values="value", aggfunc="mean")
    return table.reindex(columns=[r for r in chosen["id"] if r in table.columns])


def steps(table: pd.DataFrame, runs: pd.DataFrame, min_change: float = 0.05) -> list[Step]:
    """The step changes of every series of `table` (see the module docstring)."""
    commits = dict(zip(runs["id"], runs["git_commit"], strict=True))
    found = []
    for (machine, arm, figure), values in table.iterrows():
        values = values.dropna()
        for start, before, after in change_points(values.to_numpy(dtype=float), min_change):
            run = int(values.index[start])
            found.append(Step(str(arm), str(figure), str(machine), run, commits.get(run), before, after))
    return found


def change_points(values: Any, min_change: float = 0.05) -> list[tuple[int, float, float]]:
    """(index where the new level starts, level before, level after) of each step of `values`: PELT (ruptures,
    l2 cost, segments of one point allowed) with a penalty of 2·σ²·ln(n)·3, then only cuts whose mean changes by
    more than `min_change` of the mean before it. σ is the smaller of two robust estimates of the noise: from the
    median absolute first difference (blind to a lasting step) and from the median absolute deviation of the
    values (blind to a few points off the level, such as one planted run between unchanged ones)."""
    import numpy as np
    import ruptures

    signal = np.asarray(values, dtype=float)
    n = len(signal)
    if n < 3 or np.allclose(signal, signal[0]):
        return []
    from_differences = float(np.median(np.abs(np.diff(signal)))) / (0.6745 * math.sqrt(2))
    from_level = 1.4826 * float(np.median(np.abs(signal - np.median(signal))))
    sigma = min(from_differences, from_level)
    floor = max(abs(float(np.median(signal))) * min_change / 4, 1e-12)  # steady series: a step is measured against this
    sigma = max(sigma, floor)
    penalty = 2 * sigma**2 * math.log(n) * 3
    cuts = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(signal.reshape(-1, 1)).predict(pen=penalty)
    bounds = [0, *cuts]
    found = []
    for left, cut, right in zip(bounds, bounds[1:], bounds[2:], strict=False):
        before, after = float(signal[left:cut].mean()), float(signal[cut:right].mean())
        if before and abs(after - before) > min_change * abs(before):
            found.append((cut, before, after))
    return found


def plot(table: pd.DataFrame, runs: pd.DataFrame, found: list[Step], path: Path | str) -> Path:
    """One panel per (machine, arm, figure) of `table` over the gate runs, the runs labelled by commit, each
    step marked at the run it starts at; written as PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {int(r["id"]): f"{r['id']}:{(r['git_commit'] or '?')[:7]}" for _, r in runs.iterrows()}
    panels = list(table.iterrows())
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.6 * table.shape[1] + 3), 2.2 * len(panels)), squeeze=False)
    for axis, ((machine, arm, name), values) in zip(axes[:, 0], panels, strict=True):
        values = values.dropna()
        x = list(range(len(values)))
        axis.plot(x, values.to_numpy(), marker="o")
        axis.set_xticks(x, [labels.get(int(r), str(r)) for r in values.index], rotation=45, fontsize=7)
        axis.set_title(f"{arm}: {name}", fontsize=9)
        for step in (s for s in found if (s.machine, s.arm, s.figure) == (machine, arm, name)):
            position = list(values.index).index(step.run)
            axis.axvline(position - 0.5, color="red", linestyle="--")
            axis.annotate(f"step {step.change:+.0%}", (position - 0.5, float(values.max())), color="red", fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
