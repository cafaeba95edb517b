import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbench.cell.tasks.metrics import contrastive_loss, hits_at_k, match_ranks, recall_at_k

from .conftest import examples


def test_recall_counts_a_query_when_its_true_match_ranks_within_k():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # true match (0) ranked first
            [0.8, 0.5, 0.1],  # true match (1) ranked second
            [0.7, 0.6, 0.2],  # true match (2) ranked third
        ]
    )
    positives = torch.eye(3, dtype=torch.bool)
    recall = recall_at_k(similarity, positives, (1, 2, 3))
    assert recall[1] == pytest.approx(1 / 3)
    assert recall[2] == pytest.approx(2 / 3)
    assert recall[3] == pytest.approx(1.0)


def test_recall_ties_with_a_negative_count_against_the_query():
    similarity = torch.tensor([[0.5, 0.5], [0.2, 0.9]])
    positives = torch.eye(2, dtype=torch.bool)
    recall = recall_at_k(similarity, positives, (1, 2))
    assert recall[1] == pytest.approx(0.5)  # query 0 ties with a negative: not a hit at k=1
    assert recall[2] == pytest.approx(1.0)


def test_recall_result_does_not_depend_on_candidate_order_under_ties():
    similarity = torch.tensor([[0.5, 0.5, 0.5]])
    for column in range(3):
        positives = torch.zeros(1, 3, dtype=torch.bool)
        positives[0, column] = True
        assert recall_at_k(similarity, positives, (1, 3)) == {1: 0.0, 3: 1.0}


def test_recall_with_several_captions_per_image_counts_any_true_match():
    # 4 captions, 2 images; captions 0,1 describe image 0; captions 2,3 describe image 1
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    similarity = text @ images.T
    positives = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    text_to_image = recall_at_k(similarity, positives, (1,))
    assert text_to_image[1] == pytest.approx(0.5)  # captions 1 and 3 prefer the wrong image
    image_to_text = recall_at_k(similarity.T, positives.T, (1, 2))
    # image 0's best caption is caption 0 (1.0); image 1's best caption is caption 2 (1.0): both hit at k=1
    assert image_to_text[1] == pytest.approx(1.0)


def test_image_to_text_misses_when_all_captions_rank_below_k_negatives():
    similarity = torch.tensor([[0.1, 0.2, 0.9, 0.8]])  # one image, captions 0,1 true, 2,3 false
    positives = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    assert recall_at_k(similarity, positives, (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_recall_rejects_a_query_without_positive():
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]), (1,))


def test_contrastive_loss_is_log_batch_size_for_uniform_logits_and_small_for_a_clear_diagonal():
    uniform = torch.zeros(4, 4)
    assert contrastive_loss(uniform, uniform).item() == pytest.approx(math.log(4))
    clear = torch.eye(4) * 50
    assert contrastive_loss(clear, clear.T).item() < 1e-6


# --- non-finite scores: a model that overflowed must never look better for it ---

def test_a_query_whose_scores_are_all_nan_is_a_miss_at_every_k():
    similarity = torch.tensor([[math.nan, math.nan, math.nan], [0.1, 0.9, 0.2]])
    positives = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert recall_at_k(similarity, positives, (1, 2, 3)) == {1: 0.5, 2: 0.5, 3: 0.5}


def test_nan_or_infinite_candidates_neither_match_nor_outrank_a_finite_positive():
    # query 0: its positive is NaN, a negative is +inf; query 1: finite positive, the other candidates non-finite
    similarity = torch.tensor([[math.nan, math.inf, 0.1], [0.3, math.nan, -math.inf]])
    positives = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert recall_at_k(similarity, positives, (1, 3)) == {1: 0.5, 3: 0.5}
    infinite_positive = torch.tensor([[math.inf, 0.2, 0.1]])
    assert recall_at_k(infinite_positive, torch.tensor([[1, 0, 0]], dtype=torch.bool), (1, 3)) == {1: 0.0, 3: 0.0}


def test_nan_image_embeddings_are_misses_both_ways_as_an_independent_count_gives():
    """The shape of case nan-embeddings-count-as-hits: 6 captions x 6 images, images 0-2 NaN (fp16 overflow)."""
    torch.manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    images = torch.nn.functional.normalize(texts + 0.3 * torch.randn(6, 8), dim=-1)
    images[:3] = math.nan
    similarity = texts @ images.T
    positives = torch.eye(6, dtype=torch.bool)
    by_hand = {}
    for name, sim, pos in (("t2i", similarity, positives), ("i2t", similarity.T, positives.T)):
        hits = 0
        for row, p in zip(sim, pos, strict=True):
            finite = torch.isfinite(row)
            best = row[p & finite].max() if (p & finite).any() else None
            hits += best is not None and int(((row >= best) & ~p & finite).sum()) < 1
        by_hand[name] = hits / 6
    assert recall_at_k(similarity, positives, (1,))[1] == by_hand["t2i"] <= 0.5
    assert recall_at_k(similarity.T, positives.T, (1,))[1] == by_hand["i2t"] <= 0.5


@given(
    st.integers(min_value=2, max_value=7), st.integers(min_value=2, max_value=7), st.integers(min_value=0, max_value=2**16),
)
@settings(max_examples=examples(60), deadline=None)
def test_making_whole_query_rows_nan_only_turns_those_queries_into_misses(queries, candidates, seed):
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randn(queries, candidates, generator=generator)
    positives = torch.rand(queries, candidates, generator=generator) < 0.3
    positives[torch.arange(queries), torch.randint(candidates, (queries,), generator=generator)] = True
    broken = torch.rand(queries, generator=generator) < 0.5
    spoiled = similarity.masked_fill(broken[:, None], math.nan)
    ks = tuple(range(1, candidates + 1))
    kept_hits = hits_at_k(match_ranks(similarity, positives), ks) & ~broken[:, None]
    assert recall_at_k(spoiled, positives, ks) == {k: int(kept_hits[:, i].sum()) / queries for i, k in enumerate(ks)}
