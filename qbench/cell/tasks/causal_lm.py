"""Causal language modelling: next-token LoRA fine-tune, evaluated by held-out perplexity."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qbench.cell.tasks.batch import Batch, Evaluation, TaskBase
from qbench.contract import intervals, lengths

if TYPE_CHECKING:
    from qbench.contract.suite import LoadedSuite

IGNORE = -100
MAX_LOG_FLOAT = math.log(sys.float_info.max)  # exp() of anything larger is infinite as a float64
BOOTSTRAP_METHOD = (
    "percentile bootstrap over eval windows: windows resampled with replacement, each with its summed NLL, "
    "scored tokens and UTF-8 bytes; perplexity, NLL per token and bits per byte from the resampled sums"
)


# eval.protocol -> how the record describes it ({prefix}: the rolling protocol's first input token)
PROTOCOLS = {
    "disjoint": (
        "disjoint: token perplexity over the held-out text as one stream, no special tokens, non-overlapping "
        "windows (stride = window); every token after the first scored once, padding excluded; "
        "bits_per_byte = summed NLL / ln 2 / UTF-8 bytes of the text; a token with a non-finite loss "
        "makes perplexity infinite"
    ),
    "rolling": (
        "rolling: lm-evaluation-harness's loglikelihood_rolling: token perplexity over the held-out text as one stream, "
        "no special tokens but token {prefix} (the tokenizer's BOS, else EOS) in front of the first window, every "
        "token scored once, each window after the first reading from the token before the ones it scores, the last "
        "one filled with preceding context; bits_per_byte = summed NLL / ln 2 / UTF-8 bytes of the text; a token with "
        "a non-finite loss makes perplexity infinite"
    ),
}


@dataclass(frozen=True)
class Windows:
    """Non-overlapping evaluation windows over one token stream; padding carries label IGNORE."""

    input_ids: torch.Tensor  # [windows, window]
    attention_mask: torch.Tensor
    labels: torch.Tensor  # labels[w, i] is the token after input_ids[w, i]; IGNORE where padded

    @property
    def scored_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def make_windows(token_ids: list[int] | torch.Tensor, window: int, pad_id: int) -> Windows:
    """Cut a token stream into non-overlapping windows of `window` inputs.

    Window k reads tokens [kW, kW+W) and is scored on tokens [kW+1, kW+W+1), so every token after the
    first is scored exactly once; the last window is shorter and padded, its padding not scored.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("evaluation text has fewer than two tokens")
    targets = ids.numel() - 1
    count = math.ceil(targets / window)
    input_ids = torch.full((count, window), pad_id, dtype=torch.long)
    labels = torch.full((count, window), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((count, window), dtype=torch.long)
    for k in range(count):
        start = k * window
        length = min(window, targets - start)
        input_ids[k, :length] = ids[start : start + length]
        labels[k, :length] = ids[start + 1 : start + length + 1]
        attention_mask[k, :length] = 1
    return Windows(input_ids, attention_mask, labels)


def disjoint_ranges(tokens: int, window: int) -> list[tuple[int, int]]:
    """Per window of `make_windows`, the [first, end) positions of the tokens it scores."""
    return [(k * window + 1, min((k + 1) * window + 1, tokens)) for k in range(math.ceil((tokens - 1) / window))]


def rolling_windows(token_ids: list[int] | torch.Tensor, window: int, prefix_id: int,
                    pad_id: int) -> tuple[Windows, list[tuple[int, int]]]:
    """lm-evaluation-harness's `loglikelihood_rolling` windows over one token stream (its get_rolling_token_windows
    with context_len 1, then make_disjoint_window), and per window the [first, end) positions of the tokens it scores.

    The first window reads the prefix token (BOS) and tokens [0, W-1) and scores tokens [0, W): the first token is
    scored too. Each next window scores the next W tokens, reading from the token just before them; the last one
    scores what is left and reads a full window of the tokens before it, so its tokens have more context than
    disjoint windows give. Every token is scored exactly once; only a stream shorter than W pads its one window.
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("evaluation text has no tokens")
    first = min(window, len(ids))
    rows = [([prefix_id, *ids[: first - 1]], ids[:first])]
    ranges = [(0, first)]
    predicted = first
    while predicted < len(ids):
        scored = min(len(ids) - predicted, window)
        end = predicted + scored
        context = ids[end - window - 1 : end - 1]
        rows.append((context, [IGNORE] * (len(context) - scored) + ids[end - scored : end]))
        ranges.append((end - scored, end))
        predicted = end
    input_ids = torch.full((len(rows), window), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), window), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), window), dtype=torch.long)
    for k, (row, targets) in enumerate(rows):
        input_ids[k, : len(row)] = torch.tensor(row)
        labels[k, : len(targets)] = torch.tensor(targets)
        attention_mask[k, : len(row)] = 1
    return Windows(input_ids, attention_mask, labels), ranges


def range_bytes(text: str, char_starts: list[int], first: int, end: int) -> int:
    """UTF-8 bytes of the text that tokens [first, end) cover: from the first character of token `first` (the start
    of the text for token 0) to the first character of token `end` (or the end of the text), so the ranges of a
    protocol's windows partition the text they score and whitespace no offset includes is counted once."""
    start = 0 if first == 0 else char_starts[first]
    stop = char_starts[end] if end < len(char_starts) else len(text)
    return len(text[start:stop].encode("utf-8"))


def spread_windows(count: int, keep: int | None) -> list[int]:
    """Indices of `keep` windows out of `count`, evenly spaced from the first to the last (all when keep is None
    or not smaller), so that a capped evaluation still samples the whole held-out text, not just its start."""
    if keep is None or keep >= count:
        return list(range(count))
    if keep == 1:
        return [0]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def select_windows(windows: Windows, indices: list[int]) -> Windows:
    return Windows(windows.input_ids[indices], windows.attention_mask[indices], windows.labels[indices])


def scored_bytes(text: str, char_starts: list[int], window: int, indices: list[int]) -> int:
    """UTF-8 bytes of the text that the scored tokens of the chosen windows cover.

    Window k scores tokens kW+1 .. kW+W; its text runs from the first character of token kW+1 to the
    first character of token (k+1)W+1 (or the end of the text), so the windows' spans partition the text
    after the first token and whitespace a tokenizer leaves out of every offset is counted once.
    """
    return sum(range_bytes(text, char_starts, k * window + 1, (k + 1) * window + 1) for k in indices)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of negative log-likelihoods (nats) of the labelled positions; IGNORE positions excluded."""
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def perplexity_metrics(total_nll: float, scored_tokens: int, text_bytes: int) -> dict[str, float]:
    """Token perplexity and bits per UTF-8 byte from a summed NLL in nats; a non-finite sum (a token the
    model gave a NaN or infinite loss) makes every figure infinite: it is never averaged away."""
    if not math.isfinite(total_nll):
        return {"perplexity": math.inf, "nll_per_token": math.inf, "bits_per_byte": math.inf}
    per_token = total_nll / scored_tokens
    return {
        "perplexity": math.exp(per_token) if per_token < MAX_LOG_FLOAT else math.inf,  # beyond a float64
        "nll_per_token": per_token,
        "bits_per_byte": total_nll / math.log(2) / text_bytes,
    }


PAIRED_METHOD = (
    "paired percentile bootstrap over the eval windows: the same resampled windows for both evaluations, each "
    "replicate's difference of perplexity, NLL per token and bits per byte from the two resampled sums"
)


def paired_differences(a: Evaluation, b: Evaluation, tokens: torch.Tensor, byte_shares: torch.Tensor) -> dict[str, intervals.Interval] | None:
    """The interval of `a - b` for perplexity, NLL per token and bits per byte, paired over the windows both
    evaluations scored (their `window_nll`); None when either lacks them or they differ in count."""
    nll_a, nll_b = a.per_window.get("window_nll"), b.per_window.get("window_nll")
    if nll_a is None or nll_b is None or len(nll_a) != len(nll_b) or len(nll_a) != len(tokens):
        return None
    units = [np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64),
             tokens.to(torch.float64).numpy(), byte_shares.to(torch.float64).numpy()]
    found = intervals.bootstrap(units, _paired_figures, paired=True)
    return dict(zip(("perplexity", "nll_per_token", "bits_per_byte"), found, strict=True))


def _paired_figures(nll_a, nll_b, tokens, byte_shares, axis):
    """Perplexity, NLL per token and bits per byte of `a` less `b`, over the same windows."""
    per_token_a, per_token_b = nll_a.sum(axis=axis) / tokens.sum(axis=axis), nll_b.sum(axis=axis) / tokens.sum(axis=axis)
    return np.stack([np.exp(per_token_a) - np.exp(per_token_b), per_token_a - per_token_b,
                     (nll_a.sum(axis=axis) - nll_b.sum(axis=axis)) / math.log(2) / byte_shares.sum(axis=axis)])


@dataclass(frozen=True)
class WindowScores:
    """Per eval window: summed NLL in nats (float64; +inf where a scored token's loss is not finite) and
    scored tokens; and the non-finite outputs met: scored positions whose logits hold a NaN or infinite
    value, and scored tokens whose NLL is NaN or infinite."""

    nll: torch.Tensor  # [windows]
    tokens: torch.Tensor  # [windows]
    nonfinite_logits: int
    nonfinite_losses: int


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: Windows, batch_size: int, device: str) -> WindowScores:
    """Run `model` over `windows` and score every labelled position (padding excluded)."""
    sums, bad_logits, bad_losses = [], 0, 0
    for start in range(0, windows.input_ids.shape[0], batch_size):
        part = slice(start, start + batch_size)
        nll, logits_bad, losses_bad = score_batch(
            model, windows.input_ids[part].to(device), windows.attention_mask[part].to(device), windows.labels[part].to(device)
        )
        bad_logits += int(logits_bad)
        bad_losses += int(losses_bad)
        sums.append(nll.cpu())
    tokens = (windows.labels != IGNORE).sum(dim=1)
    return WindowScores(torch.cat(sums), tokens, bad_logits, bad_losses)


def score_batch(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of windows: (summed NLL per window in float64, +inf where a scored token's loss is not
    finite; scored positions with a non-finite logit; scored tokens with a non-finite NLL), as tensors."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    scored = labels != IGNORE
    token_nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).reshape(labels.shape)
    bad_logits = (~torch.isfinite(logits).all(dim=-1) & scored).sum()
    broken = ~torch.isfinite(token_nll) & scored
    token_nll = token_nll.masked_fill(broken, math.inf).masked_fill(~scored, 0.0)  # NaN -> +inf: never averaged away
    return token_nll.double().sum(dim=1), bad_logits, broken.sum()


def window_bytes(windows: Windows, text_bytes: int, decode: Any = None) -> torch.Tensor:
    """UTF-8 bytes each window scores, summing to `text_bytes`: from `decode` (token ids -> text) where
    given, else shared out by scored tokens. Decoding window by window can add or drop a byte at a
    window's edge (a leading space, a character split between windows); the share is rescaled to the total."""
    tokens = (windows.labels != IGNORE).sum(dim=1).to(torch.float64)
    if decode is not None:
        sizes = torch.tensor(
            [len(decode(row[row != IGNORE].tolist()).encode("utf-8")) for row in windows.labels], dtype=torch.float64
        )
        if float(sizes.sum()) > 0:
            return sizes * (text_bytes / float(sizes.sum()))
    return tokens * (text_bytes / float(tokens.sum()))


def _window_figures(nll, tokens, byte_shares, axis):
    """Perplexity, NLL per token and bits per byte of windows from their summed NLL, tokens and bytes."""
    nll_per_token = nll.sum(axis=axis) / tokens.sum(axis=axis)
    return np.stack([np.exp(nll_per_token), nll_per_token, nll.sum(axis=axis) / math.log(2) / byte_shares.sum(axis=axis)])


def perplexity_evaluation(scores: WindowScores, text_bytes: int, byte_shares: torch.Tensor | None = None) -> Evaluation:
    """Perplexity, NLL per token and bits per byte over every window, each with a bootstrap interval over
    windows, plus the counts of non-finite logits and losses."""
    total_tokens = int(scores.tokens.sum())
    metrics: dict[str, float] = dict(perplexity_metrics(float(scores.nll.sum()), total_tokens, text_bytes))
    if byte_shares is None:
        byte_shares = scores.tokens.to(torch.float64) * (text_bytes / max(total_tokens, 1))
    names = ("perplexity", "nll_per_token", "bits_per_byte")
    units = [scores.nll.numpy(), scores.tokens.to(torch.float64).numpy(), byte_shares.to(torch.float64).numpy()]
    found = dict(zip(names, intervals.bootstrap(units, _window_figures, paired=True), strict=True))
    metrics["nonfinite_logits"] = scores.nonfinite_logits
    metrics["nonfinite_losses"] = scores.nonfinite_losses
    return Evaluation(metrics, found, BOOTSTRAP_METHOD, {"window_nll": scores.nll.tolist()})


def evaluate_perplexity(model: torch.nn.Module, windows: Windows, text_bytes: int, batch_size: int, device: str,
                        byte_shares: torch.Tensor | None = None) -> Evaluation:
    """Perplexity of `model` over `windows` (padding excluded, every scored token counted once), with intervals."""
    return perplexity_evaluation(score_windows(model, windows, batch_size, device), text_bytes, byte_shares)


def load_texts(loaded_suite: LoadedSuite, read: dict[str, str] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(train text, eval text, record fields naming where they came from and their hash). `read` gets, per suite
    key ("data.train", "data.eval"), the sha256 of the file as read (of the text, for a builtin corpus)."""
    from qbench.cell.data import text
    from qbench.contract.fingerprint import FileHashes

    data = loaded_suite.suite.data
    hashes = FileHashes()
    if data.kind == "builtin":
        corpus = text.builtin_corpus(data.name)
        source = f"builtin:{data.name}: {corpus.source}"
        hashes.add_data_file("data.train", corpus.train)
        hashes.add_data_file("data.eval", corpus.eval)
    elif data.kind == "text":
        train = text.load_text_file(loaded_suite.resolve(data.train), hashes, "data.train")
        held_out = text.load_text_file(loaded_suite.resolve(data.eval), hashes, "data.eval")
        corpus = text.TextCorpus.from_parts(train, held_out, f"text files: {data.train} / {data.eval}")
        source = corpus.source
    else:
        raise ValueError(f"the causal_lm task reads text (kind builtin or text), not {data.kind!r}")
    if read is not None:
        read.update(hashes.data_file)
    return corpus.train, corpus.eval, {
        "data.source": source,
        "data.sha256": corpus.sha256,
        "data.train_chars": len(corpus.train),
        "data.eval_chars": len(corpus.eval),
    }


class CausalLMTask(TaskBase):
    """AutoModelForCausalLM + tokenizer; next-token loss on random windows; perplexity on held-out text."""

    name = "causal_lm"
    model_class_name = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"

    def prepare_data(self) -> dict[str, Any]:
        from transformers import AutoConfig, AutoTokenizer

        spec = self.suite.model
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        config = AutoConfig.from_pretrained(self.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        train_text, eval_text, info = load_texts(self.loaded_suite, self.data_read)
        limit = lengths.causal_lm_limit(config, self.tokenizer.model_max_length)
        self.window = lengths.eval_window(self.suite, limit)  # ValueError for a length past the model's context
        self.max_length, source = lengths.train_max_length(self.suite, limit)
        info.update(limit.record())
        info.update({"config.train.max_length": self.max_length, "train.max_length_source": source})
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.train_ids = torch.tensor(encode(train_text), dtype=torch.long)
        if self.train_ids.numel() <= self.max_length:
            raise ValueError(f"training text has {self.train_ids.numel()} tokens, fewer than train.max_length + 1")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        name = self.suite.eval.protocol
        prefix_id = self._prefix_id() if name == "rolling" else None
        protocol = PROTOCOLS[name].format(prefix=prefix_id)
        max_windows = self.suite.eval.max_windows
        if max_windows is None:
            self.windows, _ = self._windows(encode(eval_text), pad_id, prefix_id)
            self.eval_bytes = len(eval_text.encode("utf-8"))
            self.window_bytes = window_bytes(self.windows, self.eval_bytes, self.tokenizer.decode)
            all_windows = int(self.windows.input_ids.shape[0])
        else:
            encoded = self.tokenizer(eval_text, add_special_tokens=False, return_offsets_mapping=True)
            every, ranges = self._windows(encoded["input_ids"], pad_id, prefix_id)
            all_windows = int(every.input_ids.shape[0])
            chosen = spread_windows(all_windows, max_windows)
            self.windows = select_windows(every, chosen)
            starts = [start for start, _ in encoded["offset_mapping"]]
            # each chosen window's bytes exactly (the spans partition the text), summing to eval_bytes
            self.window_bytes = torch.tensor([float(range_bytes(eval_text, starts, *ranges[k])) for k in chosen],
                                             dtype=torch.float64)
            self.eval_bytes = int(self.window_bytes.sum())
            protocol = protocol.replace("over the held-out text as one stream", (
                f"over {len(chosen)} of the held-out text's {all_windows} windows, evenly spread (eval.max_windows), "
                "the text cut as one stream")).replace("UTF-8 bytes of the text", "UTF-8 bytes of the text the scored tokens cover")
        info["eval.prefix_token_id"] = prefix_id
        info.update(
            {
                "data.train_tokens": int(self.train_ids.numel()),
                "eval.window_tokens": self.window,
                "eval.window_source": "eval.window" if self.suite.eval.window else limit.source,
                "eval.stride_tokens": self.window,
                "eval.windows": int(self.windows.input_ids.shape[0]),
                "eval.available_windows": all_windows,
                "eval.scored_tokens": self.windows.scored_tokens,
                "eval.bytes": self.eval_bytes,
                "eval.tokenizer": f"{self.tokenizer.__class__.__name__} from {spec.id} (vocab {len(self.tokenizer)})",
                "eval.protocol": protocol,
                "per_window.scored_tokens": (self.windows.labels != IGNORE).sum(dim=1).tolist(),
            }
        )
        return info

    def _prefix_id(self) -> int:
        """The token lm-evaluation-harness puts in front of a rolling evaluation: BOS, else EOS (its prefix_token_id)."""
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        raise ValueError("eval.protocol = 'rolling' puts the tokenizer's BOS (or EOS) token in front, and this "
                         "tokenizer has neither")

    def _windows(self, ids: list[int], pad_id: int, prefix_id: int | None) -> tuple[Windows, list[tuple[int, int]]]:
        """The protocol's windows over the token stream, and the token positions each scores."""
        if prefix_id is not None:
            return rolling_windows(ids, self.window, prefix_id, pad_id)
        return make_windows(ids, self.window, pad_id), disjoint_ranges(len(ids), self.window)

    def train_batches(self, seed: int) -> Iterator[Batch]:
        """Random windows of max_length + 1 tokens from the training text, drawn with a seeded generator."""
        generator = torch.Generator().manual_seed(seed)
        length, size = self.max_length, self.suite.train.batch_size
        offsets = torch.arange(length + 1)
        while True:
            starts = torch.randint(0, self.train_ids.numel() - length, (size,), generator=generator)
            window = self.train_ids[starts[:, None] + offsets]
            inputs = {"input_ids": window[:, :-1].to(self.device), "labels": window[:, 1:].to(self.device)}
            yield Batch(inputs, samples=size, tokens=size * length)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.inputs["input_ids"]).logits
        labels = batch.inputs["labels"]
        return summed_nll(logits, labels) / labels.numel()

    def differences(self, a: Evaluation, b: Evaluation) -> tuple[dict[str, intervals.Interval], str]:
        """`a - b` paired over the eval windows (both scored the same ones), else as TaskBase does."""
        tokens = (self.windows.labels != IGNORE).sum(dim=1)
        paired = paired_differences(a, b, tokens, self.window_bytes)
        return (paired, PAIRED_METHOD) if paired is not None else super().differences(a, b)

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        was_training = model.training
        model.eval()
        try:
            return evaluate_perplexity(model, self.windows, self.eval_bytes, self.suite.eval.batch_size, self.device,
                                       self.window_bytes)
        finally:
            model.train(was_training)
