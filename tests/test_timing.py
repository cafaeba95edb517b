import pytest

from qbench.cell.measure import timing


def test_throughput_is_samples_over_wall_seconds_of_timed_steps(monkeypatch):
    clock = iter([0.0, 5.0, 5.0, 6.0, 6.0, 7.0, 7.5, 9.5])  # step 1 is warm-up (5 s), then 1 s, 1 s, 2 s with a 0.5 s gap
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = timing.StepTimer(untimed_steps=1)
    for _ in range(4):
        timer.start()
        timer.stop(samples=10, tokens=100)
    summary = timer.summary()
    assert summary["speed.timed_steps"] == 3
    assert summary["speed.timed_wall_s"] == pytest.approx(4.5)  # from 5.0 to 9.5, the gap included
    assert summary["speed.train_samples_per_s"] == pytest.approx(30 / 4.5)
    assert summary["speed.train_tokens_per_s"] == pytest.approx(300 / 4.5)
    assert summary["speed.step_time_p50_s"] == pytest.approx(1.0)
    assert summary["speed.step_time_p90_s"] == pytest.approx(1.8)


def test_no_timed_steps_gives_missing_not_zero():
    timer = timing.StepTimer(untimed_steps=5)
    timer.start()
    timer.stop(1, 1)
    assert timer.summary()["speed.train_samples_per_s"] is None


def test_on_cuda_the_clock_is_read_only_after_synchronising(monkeypatch):
    import torch

    events = []
    ticks = iter(range(100))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: events.append("synchronize"))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or float(next(ticks)))
    timer = timing.StepTimer(untimed_steps=1, cuda=True)
    for _ in range(3):
        timer.start()
        timer.stop(samples=4, tokens=40)
    assert events == ["synchronize", "clock"] * 6
    summary = timer.summary()
    assert summary["speed.timed_steps"] == 2
    assert summary["speed.train_samples_per_s"] == pytest.approx(8 / 3.0)  # clock 2 -> 5 spans the two timed steps


def test_p50_and_p90_of_ten_steps_match_numpys_default_quantiles(monkeypatch):
    import numpy as np

    durations = [0.10, 0.12, 0.11, 0.30, 0.10, 0.13, 0.50, 0.12, 0.11, 0.14]
    clock, now = [], 0.0
    for duration in durations:
        clock += [now, now + duration]
        now += duration
    ticks = iter(clock)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    timer = timing.StepTimer(untimed_steps=0)
    for _ in durations:
        timer.start()
        timer.stop(samples=1, tokens=1)
    summary = timer.summary()
    assert summary["speed.step_time_p50_s"] == pytest.approx(np.quantile(durations, 0.5))
    assert summary["speed.step_time_p90_s"] == pytest.approx(np.quantile(durations, 0.9))
    assert summary["speed.train_samples_per_s"] == pytest.approx(10 / sum(durations))
