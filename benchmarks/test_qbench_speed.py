"""qbench's own speed: the embedded matrix's wall time, where each cell's time goes, and the CI gate.

    python -m pytest benchmarks/test_qbench_speed.py -s                      # judged against the targets below
    python -m pytest benchmarks/test_qbench_speed.py -s --benchmark-disable  # a smoke run (CI): a short matrix, no targets
    QBENCH_MATRIX_OPTIONS="--parallel 2" python -m pytest benchmarks/test_qbench_speed.py -s -k matrix

Targets (issues 12 and 28), on a quiet 2-core CPU, judged only when benchmarking:
- `qbench run suites/clip.toml` (six cells, the suite's steps and eval unchanged): at most 60 s wall, its first
  cell started at most 5 s after the command;
- fixed cost per cell (its process's wall time less its measured phases): at most 2 s;
- `.ci/run`'s regression gate (`qbench gate suites/ci.toml`: the suite run with the baseline commit's code and
  with this code in turns, judged; then the report): at most 240 s (issue 26), on a shared machine too.
The harness overhead against a bare loop is benchmarks/test_overhead.py; the same job beside busy processes is
benchmarks/test_threads_under_load.py. Each figure is printed and kept
in the benchmark's extra_info; `qbench run` is run as a user runs it, in its own process.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MATRIX_TARGET_S = float(os.environ.get("QBENCH_MATRIX_TARGET_S", "60"))
FIRST_CELL_TARGET_S = float(os.environ.get("QBENCH_FIRST_CELL_TARGET_S", "5"))
FIXED_COST_TARGET_S = float(os.environ.get("QBENCH_FIXED_COST_TARGET_S", "2"))
GATE_TARGET_S = float(os.environ.get("QBENCH_GATE_TARGET_S", "240"))
PHASES = ("data", "load", "prepare", "eval_before", "train", "eval_after")  # the measured phases of a cell
SMOKE_SHORTENING = {"steps = 200": "steps = 6", "warmup_steps = 10": "warmup_steps = 1",
                    'precisions = ["dense", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"]': 'precisions = ["dense", "nf4"]'}


def _qbench(*args: str, cwd: Path, first_cell_under: Path | None = None) -> tuple[int, float, str]:
    """`python -m qbench ARGS` as a user runs it: (exit code, wall seconds, output tail). With `first_cell_under`
    (the run's --out), FIRST_CELL_S[ARGS] gets the seconds from the command's start to its first cell's start
    (a cell's log file appears as its process is launched)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen([sys.executable, "-m", "qbench", *args], cwd=cwd, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, text=True)
        first_cell = None
        while process.poll() is None:
            if first_cell is None and first_cell_under is not None and any(first_cell_under.glob("*/*/logs/*.log")):
                first_cell = time.perf_counter() - started
            time.sleep(0.01)
        wall = time.perf_counter() - started
        output.seek(0)
        tail = output.read()[-3000:]
    FIRST_CELL_S[tuple(args)] = first_cell
    return process.returncode, wall, tail


FIRST_CELL_S: dict[tuple[str, ...], float | None] = {}


def run_figures(run_dir: Path, wall_s: float) -> dict:
    """What a run's records say about where its time went."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]
    manifest = json.loads((run_dir / "run.json").read_text())
    cells_wall = [r["time.cell.wall_s"] for r in records]
    phases = [sum(r.get(f"time.{p}.wall_s") or 0.0 for p in PHASES) for r in records]
    fixed = [wall - measured for wall, measured in zip(cells_wall, phases, strict=True)]
    return {
        "cells": len(records),
        "wall_s": wall_s,
        "cells_wall_s": sum(cells_wall),
        "train_s_sum": sum(r["time.train.wall_s"] for r in records),
        "phases_s_sum": sum(phases),
        "fixed_cost_per_cell_s": statistics.fmean(fixed),
        "fixed_cost_max_s": max(fixed),
        "run_start_s": manifest.get("timing", {}).get("start_s"),
        "outside_cells_s": wall_s - sum(cells_wall),  # interpreter, preflight, fork server, report
        "steps": records[0].get("config.train.steps"),
        "eval_images": records[0].get("data.eval_images"),
        "threads_per_cell": records[0].get("env.torch_threads"),
        "compute_dtype": records[0].get("config.compute_dtype"),
        "cell_launcher": records[0].get("env.cell_launcher"),
        "contended_cells": sum(bool(r.get("speed.contended")) for r in records),
        **{f"recall@1_after.{r['precision']}": r.get("quality.eval_after.mean_recall@1") for r in records},
        **{f"recall@1_before.{r['precision']}": r.get("quality.eval_before.mean_recall@1") for r in records},
    }


def _show(title: str, figures: dict) -> None:
    lines = [f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}" for k, v in figures.items()]
    print(f"\n{title}\n" + "\n".join(lines))


def test_embedded_matrix_wall_time_and_fixed_cost_per_cell(benchmark, tmp_path):
    suite = REPO / "suites" / "clip.toml"
    if benchmark.disabled:  # a smoke run keeps this working in CI without spending minutes
        text = suite.read_text()
        for full, short in SMOKE_SHORTENING.items():
            assert full in text, f"suites/clip.toml no longer has {full!r}: update SMOKE_SHORTENING"
            text = text.replace(full, short)
        suite = tmp_path / "clip.toml"
        suite.write_text(text)
    options = shlex.split(os.environ.get("QBENCH_MATRIX_OPTIONS", ""))
    outcome = {}

    args = ("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu", *options)

    def matrix() -> None:
        outcome["code"], outcome["wall"], outcome["tail"] = _qbench(*args, cwd=tmp_path, first_cell_under=tmp_path / "out")

    benchmark.pedantic(matrix, rounds=1, iterations=1)
    assert outcome["code"] == 0, outcome["tail"]
    (run_dir,) = (tmp_path / "out" / "clip").iterdir()
    figures = {**run_figures(run_dir, outcome["wall"]), "first_cell_started_s": FIRST_CELL_S[args], "load_average_1min": os.getloadavg()[0]}
    benchmark.extra_info.update(figures)
    _show(f"embedded matrix ({suite.name}{' ' + ' '.join(options) if options else ''})", figures)
    assert figures["train_s_sum"] < figures["cells_wall_s"] <= figures["wall_s"]
    if benchmark.disabled:
        return
    assert figures["cells"] == 6 and figures["steps"] == 200
    assert figures["wall_s"] <= MATRIX_TARGET_S, f"the matrix took {figures['wall_s']:.1f} s (target {MATRIX_TARGET_S:.0f} s)"
    assert figures["fixed_cost_per_cell_s"] <= FIXED_COST_TARGET_S, (
        f"fixed cost {figures['fixed_cost_per_cell_s']:.2f} s per cell (target {FIXED_COST_TARGET_S:.0f} s)")
    assert figures["first_cell_started_s"] <= FIRST_CELL_TARGET_S, (
        f"the first cell started {figures['first_cell_started_s']:.1f} s after the command (target {FIRST_CELL_TARGET_S:.0f} s)")


def test_ci_gate_wall_time(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("the CI job runs the gate itself; judged only when benchmarking")
    out = tmp_path / "gate"
    seconds = {}

    def gate() -> None:
        seconds["gate_exit"], seconds["gate"], tail = _qbench(
            "gate", str(REPO / "suites" / "ci.toml"), "--baseline", str(REPO / "results" / "baselines" / "ci"),
            "--device", "cpu", "--out", str(out), cwd=REPO)
        assert seconds["gate_exit"] in (0, 1), tail
        _, seconds["report"], _ = _qbench("report", str(out / "new"), "--out", str(out / "report"), cwd=REPO)

    benchmark.pedantic(gate, rounds=1, iterations=1)
    run_dir = sorted((out / "new").glob("*/ci/*"))[0]
    figures = {**run_figures(run_dir, seconds["gate"]), "report_s": seconds["report"], "gate_exit": seconds["gate_exit"],
               "gate_s": seconds["gate"] + seconds["report"]}
    benchmark.extra_info.update(figures)
    _show("CI gate (qbench gate suites/ci.toml, then its report)", figures)
    assert figures["gate_s"] <= GATE_TARGET_S, f"the gate took {figures['gate_s']:.1f} s (target {GATE_TARGET_S:.0f} s)"
