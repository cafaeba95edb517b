"""Speed you can trust on a shared CPU: `qbench compare` judges CPU-time ratios there, and does not judge the
wall-time ratios of a run whose cells waited for a core; a real slowdown still fails (synthetic records of six
runs a side: a ratio is judged by a rank test over its cells, which needs six to reject at p < 0.01)."""

from __future__ import annotations

import pandas as pd

from qbench.analysis.gate import compare
from qbench.contract import fields

from .records import make_runs

WALL = "ratio.speed.train_samples_per_s"
CPU = "ratio.speed.train_samples_per_cpu_s"


def with_cpu_time(records: list[dict], contended: bool | None = False) -> list[dict]:
    """Records as this branch writes them: CPU-time throughput beside wall throughput, and the contention flag."""
    for record in records:
        record["speed.train_samples_per_cpu_s"] = record["speed.train_samples_per_s"] * 1.05
        record["speed.contended"] = contended
    return records


def changed(records: list[dict], precision: str, **factors: float) -> list[dict]:
    for record in records:
        if record["precision"] == precision:
            for key, factor in factors.items():
                record[key.replace("__", ".")] *= factor
    return records


def verdicts(result: compare.Comparison, metric: str) -> dict[str, str]:
    rows = result.checks[result.checks["metric"] == metric]
    return dict(zip(rows["precision"], rows["verdict"], strict=True))


def test_the_cpu_time_twin_of_a_throughput_field():
    assert fields.cpu_time_field("speed.train_samples_per_s") == "speed.train_samples_per_cpu_s"
    assert fields.cpu_time_field("speed.train_samples_per_cpu_s") is None
    assert fields.spec_for(CPU).direction == "higher"  # more samples per CPU-second is better


def test_a_busy_moment_during_one_cell_does_not_fail_the_gate_when_its_cpu_time_is_unchanged():
    baseline = pd.DataFrame(with_cpu_time(make_runs()))
    # the machine got busy while nf4-dq trained: its wall-clock throughput halved, its CPU time did not move
    new = pd.DataFrame(changed(with_cpu_time(make_runs(prefix="new"), contended=True), "nf4-dq",
                               speed__train_samples_per_s=0.5))
    result = compare.compare(baseline, new)
    assert result.exit_code == 0, result.markdown()
    assert verdicts(result, WALL) == {"int8": "not judged", "nf4-dq": "not judged"}
    assert verdicts(result, CPU) == {"int8": "ok", "nf4-dq": "ok"}
    assert "contended" in result.markdown() and "CPU time" in result.markdown()


def test_a_real_slowdown_fails_the_gate_even_on_a_busy_machine():
    baseline = pd.DataFrame(with_cpu_time(make_runs()))
    # 30 % more work per step: both wall and CPU time grow; the load hides the wall figure, not the CPU one
    new = pd.DataFrame(changed(with_cpu_time(make_runs(prefix="new"), contended=True), "nf4-dq",
                               speed__train_samples_per_s=0.5, speed__train_samples_per_cpu_s=1 / 1.3 / 1.3))
    result = compare.compare(baseline, new)
    assert result.exit_code == 1
    assert set(result.regressions["metric"]) == {CPU}


def test_without_contention_the_wall_time_ratio_is_judged_too():
    # a step that sleeps (waits on I/O, a lock) takes no more CPU: only wall time shows it, on a quiet machine
    baseline = pd.DataFrame(with_cpu_time(make_runs()))
    new = pd.DataFrame(changed(with_cpu_time(make_runs(prefix="new")), "nf4-dq", speed__train_samples_per_s=0.6))
    result = compare.compare(baseline, new)
    assert result.exit_code == 1
    assert set(zip(result.regressions["precision"], result.regressions["metric"], strict=True)) == {("nf4-dq", WALL)}


def test_a_baseline_without_cpu_time_declines_to_judge_a_contended_run_and_says_so():
    baseline = pd.DataFrame(make_runs())  # an older baseline: wall time only
    new = pd.DataFrame(changed(with_cpu_time(make_runs(prefix="new"), contended=True), "nf4-dq",
                               speed__train_samples_per_s=0.5))
    result = compare.compare(baseline, new)
    assert result.exit_code == 0
    assert set(verdicts(result, WALL).values()) == {"not judged"}
    assert CPU not in set(result.checks["metric"])
    assert "no CPU time to judge instead" in result.markdown()


def test_on_a_gpu_the_contention_of_the_host_cpu_does_not_turn_the_speed_gate_off():
    def on_gpu(records):
        for record in records:
            record["env.device"] = "cuda"
        return records

    baseline = pd.DataFrame(on_gpu(with_cpu_time(make_runs())))
    new = pd.DataFrame(changed(on_gpu(with_cpu_time(make_runs(prefix="new"), contended=True)), "nf4-dq",
                               speed__train_samples_per_s=0.5))
    result = compare.compare(baseline, new)
    assert result.exit_code == 1 and set(result.regressions["metric"]) == {WALL}
    assert CPU not in set(result.checks["metric"])  # host CPU time says nothing about a GPU's speed


def test_a_run_whose_cells_barely_had_a_core_is_not_judged_on_speed_at_all_and_says_why():
    # time-sliced that finely, a cell's CPU time per step moves too (its caches go cold at every slice)
    baseline = pd.DataFrame(with_cpu_time(make_runs()))
    starved = with_cpu_time(make_runs(prefix="new"), contended=True)
    for record in starved:
        record["cpu.train.share"] = 0.2
    new = pd.DataFrame(changed(starved, "nf4-dq", speed__train_samples_per_s=0.5, speed__train_samples_per_cpu_s=0.5))
    result = compare.compare(baseline, new)
    assert result.exit_code == 0
    assert set(verdicts(result, WALL).values()) == set(verdicts(result, CPU).values()) == {"not judged"}
    assert "less than 50% of the time" in result.markdown() and "quieter machine" in result.markdown()
    # the same slowdown with the cells given a core most of the time they wanted one is judged
    for record in starved:
        record["cpu.train.share"] = 0.8
    assert compare.compare(baseline, pd.DataFrame(starved)).exit_code == 1
