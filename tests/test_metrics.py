import math

import pytest
import torch

from qbench.tasks.metrics import contrastive_loss, recall_at_k


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
