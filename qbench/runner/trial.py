"""One trial of `qbench fit`: one cell of a suite at given settings, in a fresh process, into its own run folder.

This module is the fit search's one way of running anything (`TrialRunner.run_trial`). It builds the trial's
suite (the suite's text with the cell's axis values written into the settings they override, fit's step
count, and the budget its record is judged against) and runs its one cell with the runner, as `qbench run`
would: the trial's record is an ordinary record.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qbench.contract import files, grid
from qbench.contract.suite import LoadedSuite, parse


def trial_suite_text(loaded: LoadedSuite, settings: dict[str, Any], budget: int, steps: int | None) -> str:
    """The suite text of one cell: every axis at the cell's value (`settings`: precision, seed and any setting
    axis of qbench.contract.grid), `steps` optimizer steps (None: the suite's own), the [fit] budget in bytes and
    nothing to search."""
    import tomli_w

    raw = tomllib.loads(loaded.source_text())
    matrix = raw.setdefault("matrix", {})
    for axis in grid.SETTING_AXES:
        matrix.pop(axis.matrix_key, None)
        if settings.get(axis.name) is not None:  # None: an axis that does not apply to this cell (another precision's)
            section, key = axis.setting
            raw.setdefault(section, {})[key] = settings[axis.name]
    matrix.pop("exclude", None)
    matrix["precisions"] = [settings["precision"]]
    matrix["seeds"] = [settings["seed"]]
    raw["baseline"] = settings["precision"]  # one arm: it is its own baseline
    train = raw.setdefault("train", {})
    if steps is not None:
        train["steps"] = steps
        train["untimed_steps"] = min(train.get("untimed_steps", 2), steps - 1)
        train["warmup_steps"] = min(train.get("warmup_steps", 0), steps - 1)
    fit = {key: value for key, value in raw.get("fit", {}).items() if key in ("margin", "steps", "quality")}
    raw["fit"] = {**fit, "budget": budget, "axes": []}
    return tomli_w.dumps(raw)


def trial_suite(loaded: LoadedSuite, settings: dict[str, Any], budget: int, steps: int | None) -> LoadedSuite:
    """The trial's suite, validated, read from the suite's own folder (its relative paths still resolve)."""
    text = trial_suite_text(loaded, settings, budget, steps)
    return LoadedSuite(parse(text, loaded.path), loaded.path, hashlib.sha256(text.encode()).hexdigest(), text)


@dataclass
class TrialRunner:
    """Runs trials of one fit into `out` (one run folder each), on the device, launcher, compute dtype and threads
    settled once for the whole fit (qbench.runner.start)."""

    out: Path
    device: str
    executor: Any  # qbench.runner.executors.base.Executor, prepared once for the whole fit
    compute: Any = None
    threads: Any = None
    listener: Any = None

    def run_trial(self, loaded: LoadedSuite, settings: dict[str, Any], budget: int, steps: int | None, name: str) -> dict[str, Any]:
        """Run the cell at `settings` with `steps` optimizer steps (None: the suite's own) in a fresh process and
        return its record (with `fit.trial_dir`, the run folder it is in). The record is judged against `budget`."""
        from qbench.runner import runner

        trial = trial_suite(loaded, settings, budget, steps)
        cells = trial.cells()
        files.make_dirs(self.out, "--out")
        run_dir = files.create_dir_exclusive(self.out, name, "--out")
        run = runner.Run(trial, run_dir, self.device, cells, self.executor, compute=self.compute, threads=self.threads,
                         **({"listener": self.listener} if self.listener is not None else {}))
        run.write_manifest({"fit_trial": {"settings": settings, "budget_bytes": budget, "steps": steps,
                                          "created": datetime.now(UTC).isoformat(timespec="seconds")}})
        with runner.exclusive(run_dir):
            record = run.execute()[0]
        return {**record, "fit.trial_dir": str(run_dir)}
