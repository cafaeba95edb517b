"""Perplexity over non-overlapping windows, checked against a hand computation on a tiny model."""

import math

import pytest
import torch

from qbench.tasks.causal_lm import IGNORE, evaluate_perplexity, make_windows


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
    )
    return LlamaForCausalLM(config).eval()


def test_windows_score_every_token_after_the_first_exactly_once():
    windows = make_windows(list(range(1, 11)), window=4, pad_id=0)  # 10 tokens -> 9 targets
    assert windows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert windows.labels.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, IGNORE, IGNORE, IGNORE]]
    assert windows.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    scored = windows.labels[windows.labels != IGNORE].tolist()
    assert sorted(scored) == list(range(2, 11)) and windows.scored_tokens == 9


def test_a_stream_that_fills_whole_windows_has_no_padding():
    windows = make_windows(list(range(9)), window=4, pad_id=0)  # 8 targets = 2 full windows
    assert windows.input_ids.shape == (2, 4) and bool((windows.labels != IGNORE).all())


def test_perplexity_matches_a_hand_computation_window_by_window(tiny_lm):
    tokens = [3, 7, 1, 12, 5, 5, 9, 2, 11, 4]
    window = 4
    # by hand: each window on its own, unpadded; log-probability of each next token
    total_nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        inputs = tokens[start : start + window]
        targets = tokens[start + 1 : start + window + 1]
        inputs = inputs[: len(targets)]
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_lm(input_ids=torch.tensor([inputs])).logits[0].float(), dim=-1)
        for position, target in enumerate(targets):
            total_nll -= log_probs[position, target].item()
            count += 1
    assert count == len(tokens) - 1
    text_bytes = 37
    got = evaluate_perplexity(tiny_lm, make_windows(tokens, window, pad_id=0), text_bytes, batch_size=2, device="cpu")
    assert got["perplexity"] == pytest.approx(math.exp(total_nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / text_bytes, rel=1e-5)


def test_padding_does_not_change_the_result(tiny_lm):
    tokens = [3, 7, 1, 12, 5, 5, 9, 2, 11, 4, 6]
    windows = make_windows(tokens, 4, pad_id=0)
    one_by_one = evaluate_perplexity(tiny_lm, windows, 10, batch_size=1, device="cpu")
    batched = evaluate_perplexity(tiny_lm, windows, 10, batch_size=8, device="cpu")
    assert batched["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)
    padded_with_other_id = evaluate_perplexity(tiny_lm, make_windows(tokens, 4, pad_id=12), 10, batch_size=8, device="cpu")
    assert padded_with_other_id["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)


def test_too_short_text_is_refused():
    with pytest.raises(ValueError, match="fewer than two tokens"):
        make_windows([5], 4, 0)
