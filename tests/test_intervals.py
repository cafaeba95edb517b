"""Every quality figure carries a bootstrap interval in the record, even with one seed (issue 11, kind 6)."""

from __future__ import annotations

import math

import pytest
import torch

from qbench.cell.tasks import intervals
from qbench.cell.tasks.batch import Evaluation
from qbench.cell.tasks.causal_lm import WindowScores, perplexity_evaluation
from qbench.cell.tasks.clip import retrieval_evaluation
from qbench.contract import fields


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


def test_the_bootstrap_of_a_coco_sized_eval_set_stays_in_bounded_memory():
    hits = (torch.arange(25_000) % 3 == 0).to(torch.float64)[:, None]  # 25,000 captions
    sums = intervals.resampled_sums(hits, intervals.generator())
    assert sums.shape == (1000, 1)
    assert float((sums[:, 0] / 25_000).mean()) == pytest.approx(1 / 3, abs=0.002)
