import pytest

from qbench.measure import timing


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
