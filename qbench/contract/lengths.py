"""The longest sequence a model takes, read from its config (or tokenizer), and every length of a suite
checked against it.

A CLIP text tower has learned position embeddings (77 for OpenAI's CLIP, 16 for the builtin tiny CLIP):
a caption tokenized past them cannot be encoded, and a cell fails mid-training when it draws one. A
causal LM with rotary positions (Llama) does not fail past its context: it extrapolates, and its
perplexity silently becomes another quantity. So both are refused before any cell starts, and the
limit is written into every record (`model.max_positions`, `model.max_positions_source`).

Imported by the parent (checks) and by the cell: nothing heavy at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# config attributes that hold a causal LM's context, in the order transformers' configs use them
# (GPT-2 maps max_position_embeddings to n_positions itself; MPT says max_seq_len; ChatGLM seq_length)
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")
# transformers sets tokenizer.model_max_length to int(1e30) when the tokenizer states no limit
TOKENIZER_UNSET = int(1e29)
# train.max_length when the suite does not set it, or the model's limit when that is lower (the builtin tiny
# CLIP has 16 text positions)
DEFAULT_MAX_LENGTH = 64


@dataclass(frozen=True)
class ContextLimit:
    """The most tokens a model takes in one sequence; `tokens` None when neither config nor tokenizer says."""

    tokens: int | None
    source: str  # where the figure was read ("config.max_position_embeddings", ...), or why there is none
    what: str  # in words, for messages: "its text tower's positions", "its context"

    def record(self) -> dict[str, Any]:
        """The record fields: `model.max_positions` (tokens, or None) and `model.max_positions_source`."""
        return {"model.max_positions": self.tokens, "model.max_positions_source": self.source}


def _usable(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < TOKENIZER_UNSET else None


def clip_limit(config: Any) -> ContextLimit:
    """A CLIP model's text positions (`text_config.max_position_embeddings`)."""
    tokens = _usable(getattr(getattr(config, "text_config", None), "max_position_embeddings", None))
    if tokens is not None:
        return ContextLimit(tokens, "config.text_config.max_position_embeddings", "its text tower's positions")
    return ContextLimit(None, "config.text_config states no max_position_embeddings", "its text tower's positions")


def causal_lm_limit(config: Any, tokenizer_max_length: Any = None) -> ContextLimit:
    """A causal LM's context: the first of CONTEXT_ATTRIBUTES its config sets, else the tokenizer's
    `model_max_length` when that is set; `tokens` None when neither states one."""
    for attribute in CONTEXT_ATTRIBUTES:
        tokens = _usable(getattr(config, attribute, None))
        if tokens is not None:
            return ContextLimit(tokens, f"config.{attribute}", "its context")
    tokens = _usable(tokenizer_max_length)
    if tokens is not None:
        return ContextLimit(tokens, "tokenizer.model_max_length", "its context")
    return ContextLimit(
        None, f"neither the config ({', '.join(CONTEXT_ATTRIBUTES)}) nor the tokenizer (model_max_length) states one", "its context"
    )


def model_limit(task: str, config: Any, tokenizer_max_length: Any = None) -> ContextLimit:
    """The limit of the suite's task (`clip` or `causal_lm`)."""
    return clip_limit(config) if task == "clip" else causal_lm_limit(config, tokenizer_max_length)


def train_max_length(suite: Any, limit: ContextLimit) -> tuple[int, str]:
    """(tokens per caption or training sequence, where the figure comes from): train.max_length when the
    suite sets it, else DEFAULT_MAX_LENGTH, or the model's limit when that is lower."""
    if suite.train.max_length is not None:
        return suite.train.max_length, "train.max_length"
    if limit.tokens is not None and limit.tokens < DEFAULT_MAX_LENGTH:
        return limit.tokens, f"default: the model's limit of {limit.tokens} ({limit.what}: {limit.source})"
    return DEFAULT_MAX_LENGTH, f"default {DEFAULT_MAX_LENGTH}"


def setting_key(suite: Any, name: str) -> str:
    """Where a train setting that the grid may vary is written: `matrix.<name>` when the matrix lists its
    values (qbench.contract.grid), else `train.<name>`."""
    return f"matrix.{name}" if getattr(suite.matrix, name, None) is not None else f"train.{name}"


def suite_lengths(suite: Any) -> list[tuple[str, int]]:
    """(suite key, tokens) for every sequence length the suite sets, each value of a grid's
    matrix.max_length included (the defaults fit the model by construction)."""
    if suite.matrix.max_length is not None:
        lengths = [("matrix.max_length", value) for value in suite.matrix.max_length]
    else:
        lengths = [("train.max_length", suite.train.max_length)] if suite.train.max_length is not None else []
    if suite.task == "causal_lm" and suite.eval.window is not None:
        lengths.append(("eval.window", suite.eval.window))
    return lengths


def length_problems(suite: Any, limit: ContextLimit) -> list[str]:
    """One line per length of the suite the model cannot take (naming the key, the model and its limit)."""
    model = suite.model.id
    if limit.tokens is None:
        if suite.task == "causal_lm" and suite.eval.window is None:
            return [
                f"eval.window: model {model!r} states no context length ({limit.source}), so the perplexity window "
                "cannot default to it; set eval.window (and train.max_length) to the context the model was trained with"
            ]
        return []
    problems = []
    for key, tokens in suite_lengths(suite):
        if tokens > limit.tokens:
            why = (
                "a longer caption cannot be encoded" if suite.task == "clip"
                else "past it the model extrapolates and its perplexity is another quantity"
            )
            problems.append(
                f"{key}: {tokens} tokens, but model {model!r} takes at most {limit.tokens} ({limit.what}: {limit.source}); "
                f"{why}. Set {key} to at most {limit.tokens}"
            )
    return problems


def eval_window(suite: Any, limit: ContextLimit) -> int:
    """The perplexity window: eval.window, else the model's context; ValueError when neither is usable."""
    problems = length_problems(suite, limit)
    if problems:
        raise ValueError("; ".join(problems))
    window = suite.eval.window or limit.tokens
    if window is None:  # length_problems says so above; kept for type checkers
        raise ValueError(f"eval.window: model {suite.model.id!r} states no context length")
    return int(window)
