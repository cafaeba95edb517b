"""The same-job speed gate's judgement: a rank test per arm over per-process (or per-step) samples, never "ok" on
fewer samples than it needs; exact, quality and memory still judged against the committed records; the sides'
environments and the baseline commit (synthetic records, a scratch git repository; no cell runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from qbench.analysis.gate import same_job, speed
from qbench.cell.measure import timing
from qbench.runner import gate

from .records import make_records, write_run

# per-process median step times (s) of one arm on a shared CPU: about 7 % spread and one slow process, as measured
STEADY = [0.0310, 0.0322, 0.0335, 0.0318, 0.0341, 0.0329, 0.0315, 0.0440]
OTHER = [0.0314, 0.0326, 0.0331, 0.0320, 0.0338, 0.0325, 0.0312, 0.0336]


def test_the_smallest_p_value_of_a_rank_test_and_the_fewest_samples_it_needs():
    assert speed.smallest_p(5, 5) == pytest.approx(1 / 252)
    assert speed.smallest_p(8, 8) == pytest.approx(1 / 12870)
    assert speed.smallest_p(0, 8) == 1.0
    assert speed.fewest_samples(0.01) == 5 and speed.fewest_samples(0.002) == 6  # asv continuous: 6 at p < 0.002


def test_unchanged_processes_pass_and_a_step_30_percent_slower_fails():
    same = speed.judge(STEADY, OTHER, alpha=0.01, change=0.10)
    assert same.verdict == "ok" and same.n_baseline == same.n_new == 8
    slower = speed.judge(STEADY, [v * 1.3 for v in OTHER], alpha=0.01, change=0.10)
    assert slower.verdict == "regression" and slower.p_worse < 0.01 and slower.ratio == pytest.approx(1.3, rel=0.05)
    assert "8 baseline and 8 new samples" in slower.note
    faster = speed.judge(STEADY, [v / 1.3 for v in OTHER], alpha=0.01, change=0.10)
    assert faster.verdict == "improved"


def test_a_consistent_but_small_slowdown_is_within_the_change_that_counts():
    result = speed.judge(OTHER, [v * 1.05 for v in OTHER], alpha=0.01, change=0.10)
    assert result.p_worse < 0.01 and result.verdict == "ok" and "within the 10% that counts" in result.note


def test_too_few_samples_are_not_judged_even_when_the_slowdown_is_large():
    result = speed.judge(STEADY[:3], [v * 2 for v in OTHER[:3]], alpha=0.01, change=0.10)
    assert result.verdict == speed.NOT_JUDGED
    assert "3 baseline and 3 new samples" in result.note and "needs 5 a side" in result.note


def test_the_policy_is_chosen_by_device_and_can_be_overridden():
    cpu, gpu = speed.policy_for("cpu"), speed.policy_for("cuda:1")
    assert (cpu.unit, cpu.processes, cpu.blocks) == ("process", 8, 2)
    assert (gpu.unit, gpu.processes) == ("step", 2) and gpu.processes < cpu.processes
    assert cpu.seeds_per_block == 4
    assert speed.policy_for("cpu", processes=3, blocks=5).blocks == 3  # never more runs than processes
    assert speed.fewest_samples(cpu.alpha) <= cpu.processes  # the CPU default can reject


def _side(steps_by_precision: dict[str, list[float]], run_id: str, seeds=(0,)) -> list[dict]:
    """Records of one side: each precision's cells (one per seed) with the given median step times in turn."""
    records = []
    for precision, values in steps_by_precision.items():
        for index, value in enumerate(values):
            record = make_records((precision,), (index % len(seeds) if seeds else index,), f"{run_id}-{index}")[0]
            record["seed"] = seeds[index % len(seeds)]
            record["cell_id"] = f"{precision}-seed{record['seed']}"
            record["speed.step_unqueued_time_p50_s"] = value
            record["speed.step_unqueued_times_s"] = [value * f for f in (0.98, 1.0, 1.02, 0.99, 1.01)]
            records.append(record)
    return records


def test_speed_rows_judge_each_arm_and_name_the_samples():
    reference = pd.DataFrame(_side({"bf16": STEADY, "nf4-dq": STEADY}, "a"))
    new = pd.DataFrame(_side({"bf16": OTHER, "nf4-dq": [v * 1.3 for v in OTHER]}, "b"))
    rows = {r["arm"]: r for r in speed.speed_rows(reference, new, speed.policy_for("cpu"), ["precision"])}
    assert rows["bf16"]["verdict"] == "ok" and rows["nf4-dq"]["verdict"] == "regression"
    assert rows["nf4-dq"]["n_baseline"] == rows["nf4-dq"]["n_new"] == 8
    assert "each process's median step" in rows["nf4-dq"]["judged_by"]
    # on a GPU every timed step is a sample: two processes a side are enough
    two = pd.DataFrame(_side({"bf16": STEADY[:2]}, "a")), pd.DataFrame(_side({"bf16": [v * 1.3 for v in OTHER[:2]]}, "b"))
    (row,) = speed.speed_rows(*two, speed.policy_for("cuda"), ["precision"])
    assert row["verdict"] == "regression" and row["n_new"] == 10 and "every timed step" in row["judged_by"]
    (on_cpu,) = speed.speed_rows(*two, speed.policy_for("cpu"), ["precision"])
    assert on_cpu["verdict"] == speed.NOT_JUDGED  # two processes cannot be judged where the process is the sample


def test_the_wall_time_stands_in_where_a_side_has_no_unqueued_time():
    reference = pd.DataFrame(_side({"bf16": STEADY}, "a")).drop(columns=["speed.step_unqueued_time_p50_s"])
    new = pd.DataFrame(_side({"bf16": OTHER}, "b"))
    assert speed.figure_of(reference, new) == speed.WALL_FIGURE


def _committed(tmp_path: Path) -> Path:
    folder = tmp_path / "baselines" / "ci"
    for run in ("r1", "r2"):
        write_run(folder / run, make_records(run_id=run))
    return folder


def _runs(tmp_path: Path, name: str, steps: dict[str, list[float]], seeds=(0, 1, 2, 3), recall_drop: float = 0.0) -> list[Path]:
    records = _side(steps, name, seeds)
    for record in records:
        record["quality.eval_after.mean_recall@1"] -= recall_drop
    folders = []
    for index in range(2):  # two runs a side, as the gate runs them
        part = [r for i, r in enumerate(records) if i % 8 // 4 == index]
        for record in part:
            record["run_id"] = f"{name}-{index}"
        folders.append(write_run(tmp_path / name / str(index), part))
    return folders


def test_same_job_verdict_gates_speed_against_the_baseline_side_and_the_rest_against_the_committed_records(tmp_path):
    committed = _committed(tmp_path)
    steady = {p: STEADY for p in ("bf16", "int8", "nf4-dq")}
    reference = _runs(tmp_path, "a", steady)
    unchanged = same_job.judge(committed, reference, _runs(tmp_path, "b", {p: OTHER for p in steady}), speed.policy_for("cpu"))
    assert unchanged.exit_code == 0, unchanged.markdown()
    speed_rows = unchanged.checks[unchanged.checks["kind"] == "speed"]
    assert len(speed_rows) == 3 and set(speed_rows["verdict"]) == {"ok"}
    assert not unchanged.checks["metric"].str.startswith("ratio.").any()  # no within-run ratio in the gate
    assert any("re-run in this job" in note for note in unchanged.notes)
    # the quality rows compare seed 0 only (the committed baseline's cells), not the speed samples' other seeds
    recall = unchanged.checks[unchanged.checks["metric"] == "quality.eval_after.mean_recall@1"]
    assert set(recall["n_new"]) == {2}
    slowed = same_job.judge(committed, reference, _runs(tmp_path, "c", {**{p: OTHER for p in steady}, "int8": [v * 1.3 for v in OTHER]}),
                            speed.policy_for("cpu"))
    assert slowed.exit_code == 1
    assert set(zip(slowed.regressions["arm"], slowed.regressions["metric"], strict=True)) == {("int8", speed.FIGURE)}
    worse = same_job.judge(committed, reference, _runs(tmp_path, "d", {p: OTHER for p in steady}, recall_drop=0.05),
                           speed.policy_for("cpu"))
    assert set(worse.regressions["metric"]) == {"quality.eval_after.mean_recall@1"}


def test_speed_is_not_judged_when_the_baseline_code_ran_another_experiment(tmp_path):
    committed = _committed(tmp_path)
    steady = {p: STEADY for p in ("bf16", "int8", "nf4-dq")}
    reference = _runs(tmp_path, "a", steady)
    for folder in reference:
        for cell in (folder / "cells").glob("*.json"):
            record = json.loads(cell.read_text())
            record["config.train.steps"] = 99
            cell.write_text(json.dumps(record))
    result = same_job.judge(committed, reference, _runs(tmp_path, "b", {p: [v * 2 for v in OTHER] for p in steady}), speed.policy_for("cpu"))
    speed_rows = result.checks[result.checks["kind"] == "speed"]
    assert set(speed_rows["verdict"]) == {speed.NOT_JUDGED}
    assert "config.train.steps differs" in speed_rows.iloc[0]["note"]


def test_a_step_timer_leaves_the_wait_for_a_core_out_of_the_unqueued_time(monkeypatch):
    clock = {"wall": 0.0, "queue": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(timing.time, "process_time", lambda: clock["wall"] - clock["queue"])
    monkeypatch.setattr(timing, "queue_wait_s", lambda: clock["queue"])
    timer = timing.StepTimer(untimed_steps=1)
    for waited in (0.5, 0.0, 0.2, 0.0):  # each step 1 s of wall time, of which `waited` in the run queue
        timer.start()
        clock["wall"] += 1.0
        clock["queue"] += waited
        timer.stop(samples=4, tokens=8)
    summary = timer.summary()
    assert summary["speed.step_unqueued_times_s"] == pytest.approx([1.0, 0.8, 1.0])
    assert summary["speed.step_unqueued_time_p50_s"] == pytest.approx(1.0)
    assert summary["speed.timed_queue_wait_s"] == pytest.approx(0.2)
    assert summary["speed.step_time_p50_s"] == pytest.approx(1.0)


def test_without_scheduler_statistics_the_unqueued_time_is_missing_with_its_reason(monkeypatch):
    monkeypatch.setattr(timing, "queue_wait_s", lambda: None)
    timer = timing.StepTimer(untimed_steps=0)
    timer.start()
    timer.stop(samples=1, tokens=1)
    summary = timer.summary()
    assert summary["speed.step_unqueued_time_p50_s"] is None and "schedstat" in summary["speed.queue_wait_absent_reason"]


def test_every_point_keeps_a_long_list_of_step_times_short():
    assert timing.every_point([1.0, 2.0, 3.0], points=5) == ([1.0, 2.0, 3.0], 1)
    assert timing.every_point([1.0, 3.0, 5.0, 7.0, 9.0], points=2) == ([3.0, 8.0], 3)


def test_the_baseline_side_runs_its_checkout_alone_and_the_new_side_keeps_the_jobs_python_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/plant")
    assert gate.side_env(tmp_path, inherit_path=False)["PYTHONPATH"] == str(tmp_path)
    assert gate.side_env(tmp_path, inherit_path=True)["PYTHONPATH"].split(":") == [str(tmp_path), "/plant"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_the_baseline_commit_is_read_resolved_and_checked_out(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    (tmp_path / "baseline.json").write_text(json.dumps({"commit": head}))
    assert gate.baseline_commit(tmp_path) == head
    (tmp_path / "baseline.json").write_text(json.dumps({"commit": head + "+dirty"}))
    assert gate.baseline_commit(tmp_path) is None  # code no commit holds cannot be run again
    assert gate.resolve_commit(repo, "HEAD") == head
    with pytest.raises(gate.GateError, match="git fetch"):
        gate.resolve_commit(repo, "0" * 40)
    with gate.checkout(repo, head) as tree:
        assert (tree / "a.txt").read_text() == "one"
    assert not tree.exists() and "prunable" not in _git(repo, "worktree", "list")


def test_the_gate_refuses_a_suite_outside_the_repository(tmp_path):
    from qbench.contract.suite import SuiteError

    with pytest.raises(SuiteError, match="inside the repository"):
        gate.suite_in_repo(tmp_path / "x.toml", gate.PACKAGE_ROOT)


def test_the_gate_command_refuses_bad_input_with_one_line_before_any_run(tmp_path, capsys):
    from qbench import cli
    from qbench.runner.gate import PACKAGE_ROOT

    suite = str(PACKAGE_ROOT / "suites" / "ci.toml")
    assert cli.main(["gate", suite, "--baseline", str(tmp_path / "none")]) == 2
    assert "no baseline runs there" in capsys.readouterr().err
    assert cli.main(["gate", suite, "--baseline", str(PACKAGE_ROOT / "results" / "baselines" / "ci"), "--processes", "0"]) == 2
    assert "--processes 0" in capsys.readouterr().err
    assert cli.main(["gate", suite, "--baseline", str(PACKAGE_ROOT / "results" / "baselines" / "ci"), "--against", "0" * 40]) == 2
    assert "is not in the git checkout" in capsys.readouterr().err
    outside = tmp_path / "ci.toml"
    outside.write_text((PACKAGE_ROOT / "suites" / "ci.toml").read_text())
    assert cli.main(["gate", str(outside), "--baseline", str(PACKAGE_ROOT / "results" / "baselines" / "ci")]) == 2
    assert "inside the repository" in capsys.readouterr().err


def test_the_gate_refuses_an_out_folder_that_holds_anything(tmp_path, capsys):
    from qbench import cli
    from qbench.runner.gate import PACKAGE_ROOT

    (tmp_path / "old").mkdir()
    assert cli.main(["gate", str(PACKAGE_ROOT / "suites" / "ci.toml"), "--baseline",
                     str(PACKAGE_ROOT / "results" / "baselines" / "ci"), "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
