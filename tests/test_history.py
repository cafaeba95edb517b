"""The gate's history store: every gate run's figures appended with its commit and machine, each figure over the
runs as a table and a plot, and the run (and commit) a step change started at (synthetic gate runs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis.gate import history

MACHINE = "m1"


def checks(step_s: float, ratio: float, recall: float = 0.35) -> pd.DataFrame:
    """A gate verdict's checks: the speed row of nf4-dq and dense, and a quality row."""
    rows = [{"precision": "nf4-dq", "arm": "nf4-dq", "metric": "speed.step_unqueued_time_p50_s", "kind": "speed",
             "baseline": step_s / ratio, "new": step_s, "ratio": ratio, "n_baseline": 8, "n_new": 8, "verdict": "ok"},
            {"precision": "dense", "arm": "dense", "metric": "speed.step_unqueued_time_p50_s", "kind": "speed",
             "baseline": 0.031, "new": 0.031, "ratio": 1.0, "n_baseline": 8, "n_new": 8, "verdict": "ok"},
            {"precision": "nf4-dq", "arm": "nf4-dq", "metric": "quality.eval_after.mean_recall@1", "kind": "quality",
             "baseline": recall, "new": recall, "n_baseline": 3, "n_new": 2, "verdict": "ok"}]
    return pd.DataFrame(rows)


def store_of(tmp_path: Path, figures: list[tuple[float, float]], planted: int | None = None) -> Path:
    store = tmp_path / "history" / "ci.sqlite"
    for index, (step_s, ratio) in enumerate(figures):
        verdict = "regression" if index == planted else "ok"
        history.append(store, history.GateRun("ci", f"{index:040x}", "b" * 40, MACHINE, "device=cpu", "vm", verdict,
                                              1 if index == planted else 0, 120.0, date=f"2026-12-0{index + 1}T00:00:00+00:00"),
                       checks(step_s, ratio))
    return store


UNCHANGED = [(0.0340, 1.01), (0.0336, 0.99), (0.0343, 1.02), (0.0338, 0.98)]


def test_appended_runs_read_back_with_their_commit_machine_and_figures(tmp_path):
    store = store_of(tmp_path, UNCHANGED)
    runs, figures = history.read(store)
    assert list(runs["id"]) == [1, 2, 3, 4] and set(runs["machine"]) == {MACHINE}
    assert runs.iloc[0]["git_commit"] == f"{0:040x}"
    ratios = figures[figures["figure"] == "speed.step_unqueued_time_p50_s.ratio"]
    assert len(ratios) == 8 and set(ratios["samples"]) == {8}  # two arms, four runs


def test_the_planted_last_run_is_named_as_a_step_and_nothing_else(tmp_path):
    store = store_of(tmp_path, [*UNCHANGED, (0.0440, 1.31)], planted=4)
    runs, figures = history.read(store)
    table = history.series(runs, figures)
    found = history.steps(table, runs)
    assert {(s.arm, s.figure, s.run) for s in found} == {("nf4-dq", "speed.step_unqueued_time_p50_s.ratio", 5),
                                                           ("nf4-dq", "speed.step_unqueued_time_p50_s", 5)}
    ratio = next(s for s in found if s.figure.endswith(".ratio"))
    assert ratio.commit == f"{4:040x}" and ratio.change == pytest.approx(0.30, abs=0.02)


def test_a_planted_run_between_unchanged_ones_starts_a_step_and_the_next_run_ends_it(tmp_path):
    store = store_of(tmp_path, [UNCHANGED[0], UNCHANGED[1], (0.0445, 1.30), UNCHANGED[2], UNCHANGED[3]], planted=2)
    runs, figures = history.read(store)
    found = [s for s in history.steps(history.series(runs, figures), runs) if s.figure.endswith(".ratio")]
    assert [(s.run, s.change > 0) for s in found] == [(3, True), (4, False)]


def test_a_noisy_but_unchanged_history_has_no_step(tmp_path):
    noisy = [(0.034, r) for r in (1.02, 0.97, 1.04, 0.99, 1.01, 0.96, 1.03)]
    runs, figures = history.read(store_of(tmp_path, noisy))
    assert history.steps(history.series(runs, figures), runs) == []


def test_qbench_history_prints_the_table_names_the_step_and_draws_the_plot(tmp_path, capsys):
    store = store_of(tmp_path, [*UNCHANGED, (0.0440, 1.31)], planted=4)
    plot = tmp_path / "trend.png"
    assert cli.main(["history", str(store), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "gate run 5" in out and f"{4:040x}"[:12] in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["history", str(store), "--figure", "quality.*"]) == 0
    assert "no step change" in capsys.readouterr().out


def test_a_missing_store_or_figure_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["history", str(tmp_path / "none.sqlite")]) == 2
    assert "no history store" in capsys.readouterr().err
    store = store_of(tmp_path, UNCHANGED)
    assert cli.main(["history", str(store), "--figure", "nothing.*"]) == 2
    (tmp_path / "text.sqlite").write_text("not a database")
    assert cli.main(["history", str(tmp_path / "text.sqlite")]) == 2
    assert "not a qbench history store" in capsys.readouterr().err


def test_the_machine_fingerprint_leaves_the_host_name_out():
    one = pd.DataFrame([{"env.device": "cpu", "env.cpu_model": "AMD EPYC", "env.hostname": "a", "env.torch_threads": 1}])
    other = one.assign(**{"env.hostname": "b"})
    faster = one.assign(**{"env.cpu_model": "Intel Xeon"})
    assert history.machine_fingerprint(one) == history.machine_fingerprint(other)
    assert history.machine_fingerprint(one)[0] != history.machine_fingerprint(faster)[0]


def test_a_lasting_step_is_found_where_it_starts():
    assert [(i, round(a, 2)) for i, _, a in history.change_points([1.0, 0.98, 1.02, 1.3, 1.31, 1.28])] == [(3, 1.3)]
    assert history.change_points([0.35] * 6) == []  # a deterministic figure that never moved
