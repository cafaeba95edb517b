"""Perplexity over non-overlapping windows, checked against a hand computation on a tiny model."""

import math

import pytest
import torch

from qbench.cell.tasks.causal_lm import IGNORE, evaluate_perplexity, make_windows


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
    got = evaluate_perplexity(tiny_lm, make_windows(tokens, window, pad_id=0), text_bytes, batch_size=2, device="cpu").metrics
    assert got["perplexity"] == pytest.approx(math.exp(total_nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / text_bytes, rel=1e-5)


def test_padding_does_not_change_the_result(tiny_lm):
    tokens = [3, 7, 1, 12, 5, 5, 9, 2, 11, 4, 6]
    windows = make_windows(tokens, 4, pad_id=0)
    one_by_one = evaluate_perplexity(tiny_lm, windows, 10, batch_size=1, device="cpu").metrics
    batched = evaluate_perplexity(tiny_lm, windows, 10, batch_size=8, device="cpu").metrics
    assert batched["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)
    padded_with_other_id = evaluate_perplexity(tiny_lm, make_windows(tokens, 4, pad_id=12), 10, batch_size=8, device="cpu").metrics
    assert padded_with_other_id["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)


def test_too_short_text_is_refused():
    with pytest.raises(ValueError, match="fewer than two tokens"):
        make_windows([5], 4, 0)


# --- non-finite outputs: an infinite loss is never averaged away ---

TOKENS = [3, 7, 1, 12, 5, 5, 9, 2, 11, 4, 6, 8, 10, 3, 2, 1, 7]


def _plant_nan_logits(model, positions):
    """A forward hook that makes the logits of the first window's `positions` NaN (as an overflow would)."""
    fired = []

    def plant(module, inputs, output):
        if fired:
            return output
        fired.append(True)
        output = output.clone()
        output[0, positions] = math.nan
        return output

    return model.lm_head.register_forward_hook(plant)


def test_a_window_with_a_nan_logit_makes_perplexity_infinite_and_is_counted(tiny_lm):
    windows = make_windows(TOKENS, 4, pad_id=0)
    finite = evaluate_perplexity(tiny_lm, windows, 40, batch_size=2, device="cpu")
    assert math.isfinite(finite.metrics["perplexity"]) and finite.metrics["nonfinite_logits"] == 0
    handle = _plant_nan_logits(tiny_lm, [1, 2])
    try:
        broken = evaluate_perplexity(tiny_lm, windows, 40, batch_size=2, device="cpu")
    finally:
        handle.remove()
    assert broken.metrics["perplexity"] == math.inf  # not the mean over the finite tokens
    assert broken.metrics["bits_per_byte"] == math.inf and broken.metrics["nll_per_token"] == math.inf
    assert broken.metrics["nonfinite_logits"] == 2 and broken.metrics["nonfinite_losses"] == 2
    interval = broken.intervals["perplexity"]
    assert interval.low is None and interval.high is None and interval.se is None and "non-finite" in interval.note


def test_nan_logits_at_padded_positions_are_not_scored_and_not_counted(tiny_lm):
    windows = make_windows(TOKENS[:6], 4, pad_id=0)  # 5 targets: the second window has 1 scored position
    clean = evaluate_perplexity(tiny_lm, windows, 20, batch_size=2, device="cpu").metrics

    def plant(module, inputs, output):
        output = output.clone()
        output[1, 2:] = math.nan  # padding of the second window
        return output

    handle = tiny_lm.lm_head.register_forward_hook(plant)
    try:
        got = evaluate_perplexity(tiny_lm, windows, 20, batch_size=2, device="cpu").metrics
    finally:
        handle.remove()
    assert got["nonfinite_logits"] == 0 and got["perplexity"] == pytest.approx(clean["perplexity"], rel=1e-6)


def test_a_float16_model_whose_logits_overflow_has_infinite_perplexity(tiny_lm):
    import copy

    half = copy.deepcopy(tiny_lm).half()
    with torch.no_grad():
        half.lm_head.weight.mul_(1e6)  # logits beyond float16's 65504: inf, and NaN through the softmax
    got = evaluate_perplexity(half, make_windows(TOKENS, 4, pad_id=0), 40, batch_size=2, device="cpu")
    assert got.metrics["nonfinite_logits"] > 0 and got.metrics["perplexity"] == math.inf
