"""Every quality figure carries a bootstrap interval in the record, even with one seed (issue 11, kind 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qbench.cell.tasks.batch import Evaluation
from qbench.cell.tasks.causal_lm import WindowScores, perplexity_evaluation
from qbench.cell.tasks.clip import retrieval_evaluation
from qbench.contract import fields, intervals


def _retrieval(hits_per_query: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n, n] similarity where query i ranks its own candidate first exactly when hits_per_query[i]."""
    n = len(hits_per_query)
    similarity = torch.eye(n) * 0.5
    for i, hit in enumerate(hits_per_query):
        if not hit:
            similarity[i, (i + 1) % n] = 0.9  # a negative above the positive, in both directions' terms
    return similarity, torch.eye(n, dtype=torch.bool)


def test_recall_interval_is_the_binomial_spread_of_the_queries_and_holds_the_figure():
    similarity, positives = _retrieval([i % 2 == 0 for i in range(400)])  # t2i recall@1 exactly 0.5
    evaluation = retrieval_evaluation(similarity, positives, (1,))
    assert evaluation.metrics["t2i_recall@1"] == 0.5
    t2i = evaluation.intervals["t2i_recall@1"]
    assert t2i.se == pytest.approx(math.sqrt(0.5 * 0.5 / 400), rel=0.12)  # resampling n Bernoulli queries
    assert t2i.low < 0.5 < t2i.high
    assert t2i.high - t2i.low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.2)
    mean = evaluation.intervals["mean_recall@1"]
    assert mean.low <= evaluation.metrics["mean_recall@1"] <= mean.high


def test_more_eval_queries_give_a_narrower_interval():
    small = retrieval_evaluation(*_retrieval([i % 2 == 0 for i in range(40)]), (1,)).intervals["t2i_recall@1"]
    large = retrieval_evaluation(*_retrieval([i % 2 == 0 for i in range(640)]), (1,)).intervals["t2i_recall@1"]
    assert large.se < small.se / 3  # sqrt(16) = 4 times narrower, give or take the resampling


def test_intervals_are_seeded_the_same_in_every_run():
    first = retrieval_evaluation(*_retrieval([i % 3 == 0 for i in range(90)]), (1, 5))
    second = retrieval_evaluation(*_retrieval([i % 3 == 0 for i in range(90)]), (1, 5))
    assert first.intervals == second.intervals


def test_a_single_query_has_no_interval_and_says_why():
    evaluation = retrieval_evaluation(torch.tensor([[0.9]]), torch.tensor([[True]]), (1,))
    interval = evaluation.intervals["t2i_recall@1"]
    assert (interval.low, interval.high, interval.se) == (None, None, None) and "1 eval unit" in interval.note


def test_perplexity_interval_over_windows_holds_the_figure_and_is_zero_wide_for_identical_windows():
    same = WindowScores(torch.full((20,), 40.0, dtype=torch.float64), torch.full((20,), 16), 0, 0)
    flat = perplexity_evaluation(same, text_bytes=1000)
    assert flat.metrics["perplexity"] == pytest.approx(math.exp(40 / 16))
    assert flat.intervals["perplexity"].low == pytest.approx(flat.intervals["perplexity"].high)
    assert flat.intervals["perplexity"].se == pytest.approx(0.0, abs=1e-9)
    spread = WindowScores(torch.linspace(20.0, 60.0, 20, dtype=torch.float64), torch.full((20,), 16), 0, 0)
    varied = perplexity_evaluation(spread, text_bytes=1000)
    for name in ("perplexity", "nll_per_token", "bits_per_byte"):
        interval = varied.intervals[name]
        assert interval.low < varied.metrics[name] < interval.high and interval.se > 0
    # bits per byte: the resampled NLL over the resampled windows' bytes, in bits
    assert varied.metrics["bits_per_byte"] == pytest.approx(float(spread.nll.sum()) / math.log(2) / 1000)


def test_the_record_holds_the_interval_contract_and_compare_does_not_gate_it():
    evaluation = retrieval_evaluation(*_retrieval([i % 2 == 0 for i in range(30)]), (1,))
    record = evaluation.record("eval_after")
    for name in ("i2t_recall@1", "t2i_recall@1", "mean_recall@1"):
        low, high, se = (record[f"interval.eval_after.{name}.{part}"] for part in ("low", "high", "se"))
        assert low <= record[f"quality.eval_after.{name}"] <= high and se > 0
        for part in ("low", "high", "se"):
            spec = fields.spec_for(f"interval.eval_after.{name}.{part}")
            assert spec.kind == "interval" and spec.unit == "fraction"  # scaled like recall, never gated
    assert record["interval.resamples"] == intervals.RESAMPLES == 1000
    assert record["interval.confidence"] == 0.95
    assert record["interval.method"].startswith("percentile bootstrap over eval queries")
    assert fields.interval_columns("quality.eval_after.perplexity") == {
        "low": "interval.eval_after.perplexity.low", "high": "interval.eval_after.perplexity.high", "se": "interval.eval_after.perplexity.se",
    }
    assert fields.interval_metric("interval.eval_before.perplexity.se") == "quality.eval_before.perplexity"
    assert fields.spec_for("interval.method") is None


def test_an_undefined_interval_leaves_its_reason_beside_it():
    record = Evaluation({"perplexity": math.inf}, {"perplexity": intervals.Interval(None, None, None, "undefined: x")}, "m").record("eval_before")
    assert record["interval.eval_before.perplexity.low"] is None and record["interval.eval_before.perplexity.note"] == "undefined: x"


def test_the_bootstrap_of_a_coco_sized_eval_set_gives_the_binomial_spread():
    hits = (np.arange(25_000) % 3 == 0).astype(float)  # 25,000 captions
    (interval,) = intervals.bootstrap([hits], lambda h, axis: h.mean(axis=axis), paired=True)
    assert interval.low < 1 / 3 < interval.high
    assert interval.se == pytest.approx(math.sqrt(1 / 3 * 2 / 3 / 25_000), rel=0.1)


# --- the hand-written bootstraps scipy.stats.bootstrap replaced, kept here as the reference they must match ----

def _old_resampled_sums(values: torch.Tensor, gen: torch.Generator, resamples: int = 1000) -> torch.Tensor:
    """qbench/cell/tasks/intervals.py before the move: (draw counts per unit) @ values."""
    values = values.to(torch.float64)
    units = values.shape[0]
    drawn = torch.randint(units, (resamples, units), generator=gen)
    weights = torch.zeros(resamples, units, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(resamples, units, dtype=torch.float64))
    return weights @ values


def _old_percentile(replicates: torch.Tensor) -> tuple[float, float, float]:
    low, high = torch.quantile(replicates.to(torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high, float(replicates.std(correction=1))


def _old_paired_se(nlls: list[np.ndarray], tokens: np.ndarray, statistic) -> float:
    """report/paper.py's paired bootstrap before the move: the same 2000 draws of windows for every arm."""
    draws = np.random.default_rng(0).integers(0, tokens.size, (2000, tokens.size))
    return float(np.std(statistic([np.exp(nll[draws].sum(axis=1) / tokens[draws].sum(axis=1)) for nll in nlls]), ddof=1))


def _agree_within_monte_carlo(new: intervals.Interval, old: tuple[float, float, float], resamples: int = 1000) -> None:
    """Bounds within 4 Monte-Carlo standard errors of a 2.5 % quantile of `resamples` draws (about 0.085 se for
    1000, for a near-normal statistic), standard errors within 4 of their relative error 1/sqrt(2 resamples)."""
    low, high, se = old
    quantile_error = math.sqrt(0.025 * 0.975 / resamples) / 0.0584 * se
    assert new.low == pytest.approx(low, abs=4 * quantile_error)
    assert new.high == pytest.approx(high, abs=4 * quantile_error)
    assert new.se == pytest.approx(se, rel=4 / math.sqrt(2 * resamples))


def test_recall_intervals_match_the_hand_written_bootstrap_within_monte_carlo_error():
    hits = [i % 5 in (0, 2) or i % 7 == 0 for i in range(300)]
    similarity, positives = _retrieval(hits)
    new = retrieval_evaluation(similarity, positives, (1,)).intervals
    t2i = torch.tensor(hits, dtype=torch.float64)[:, None]
    gen = torch.Generator().manual_seed(0)
    old_t2i = _old_resampled_sums(t2i, gen)[:, 0] / 300
    old_i2t = _old_resampled_sums(t2i, gen)[:, 0] / 300  # the i2t hits of this similarity are the same queries'
    _agree_within_monte_carlo(new["t2i_recall@1"], _old_percentile(old_t2i))
    _agree_within_monte_carlo(new["mean_recall@1"], _old_percentile((old_t2i + old_i2t) / 2))


def test_perplexity_intervals_match_the_hand_written_bootstrap_within_monte_carlo_error():
    rng = np.random.default_rng(3)
    tokens = rng.integers(40, 64, 120).astype(float)
    nll = tokens * rng.normal(3.0, 0.4, 120)
    new = perplexity_evaluation(WindowScores(torch.tensor(nll), torch.tensor(tokens), 0, 0), text_bytes=20_000).intervals
    sums = _old_resampled_sums(torch.tensor(np.stack([nll, tokens], axis=1)), torch.Generator().manual_seed(0))
    _agree_within_monte_carlo(new["perplexity"], _old_percentile(torch.exp(sums[:, 0] / sums[:, 1])))
    _agree_within_monte_carlo(new["nll_per_token"], _old_percentile(sums[:, 0] / sums[:, 1]))


def test_the_paired_difference_of_two_arms_matches_the_hand_written_one_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(5)
    tokens = np.full(200, 64.0)
    difficulty = rng.normal(3.0, 0.5, 200)  # shared by both arms: cancels in a paired difference
    nf4, fp4 = tokens * difficulty, tokens * (difficulty + 0.05 + rng.normal(0, 0.05, 200))

    def difference(nlls, tokens, axis):
        return np.exp(nlls[1].sum(axis=axis) / tokens.sum(axis=axis)) - np.exp(nlls[0].sum(axis=axis) / tokens.sum(axis=axis))

    (paired,) = intervals.bootstrap([nf4, fp4, tokens], lambda a, b, t, axis: difference([a, b], t, axis), paired=True, resamples=2000)
    old = _old_paired_se([nf4, fp4], tokens, lambda p: p[1] - p[0])
    assert paired.se == pytest.approx(old, rel=4 / math.sqrt(2 * 2000))
    (alone,) = intervals.bootstrap([fp4, tokens], lambda b, t, axis: np.exp(b.sum(axis=axis) / t.sum(axis=axis)), paired=True)
    assert paired.se < alone.se / 3
