"""What a task supplies to the shared loop: the Batch, the Evaluation, the Task protocol, an endless loader."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from qbench.contract.intervals import CONFIDENCE, RESAMPLES, SEED, Interval

if TYPE_CHECKING:
    from qbench.contract.suite import LoadedSuite


@dataclass
class Batch:
    """Model inputs plus how much work the batch is, for throughput."""

    inputs: dict[str, torch.Tensor]
    samples: int
    tokens: int

    def to(self, device: str | torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.samples, self.tokens)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the model on the held-out split.

    metrics:   unprefixed names (`i2t_recall@1`, `perplexity`, and the counts `nonfinite_<what>` of
               non-finite model outputs met on the way);
    intervals: a bootstrap interval for each quality metric of `metrics`, by the same name;
    method:    how the intervals were made, in words (what was resampled).
    """

    metrics: dict[str, float]
    intervals: dict[str, Interval]
    method: str
    # per eval unit scores, for comparisons of two arms paired on the same units (a causal LM's summed NLL
    # per window: `window_nll`); recorded as `per_window.<phase>.<name>` lists
    per_window: dict[str, list[float]] = field(default_factory=dict)

    def record(self, phase: str) -> dict[str, Any]:
        """Flat record fields: `quality.<phase>.<name>`, `interval.<phase>.<name>.low|high|se` (and
        `.note` where an interval is undefined), and `interval.method|resamples|confidence|seed`."""
        fields: dict[str, Any] = {f"quality.{phase}.{name}": value for name, value in self.metrics.items()}
        for name, interval in self.intervals.items():
            prefix = f"interval.{phase}.{name}."
            fields.update({prefix + "low": interval.low, prefix + "high": interval.high, prefix + "se": interval.se})
            if interval.note:
                fields[prefix + "note"] = interval.note
        fields.update({f"per_window.{phase}.{name}": list(values) for name, values in self.per_window.items()})
        fields.update({"interval.method": self.method, "interval.resamples": RESAMPLES,
                       "interval.confidence": CONFIDENCE, "interval.seed": SEED})
        return fields


UNPAIRED_METHOD = ("unpaired: the difference of the two figures, its interval the difference ± z x sqrt(se_a^2 + se_b^2) "
                   "from each figure's bootstrap standard error (wider than a paired interval: the two evaluations "
                   "share their eval set)")


def unpaired_differences(a: Evaluation, b: Evaluation) -> dict[str, Interval]:
    """`a - b` for every metric both evaluations give an interval for: the interval the normal one at CONFIDENCE
    from the two standard errors taken as independent (None bounds, with a note, where either is undefined)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    found = {}
    for name in a.intervals.keys() & b.intervals.keys():
        se_a, se_b = a.intervals[name].se, b.intervals[name].se
        delta = a.metrics[name] - b.metrics[name]
        if se_a is None or se_b is None:
            found[name] = Interval(None, None, None, "undefined: a figure has no standard error")
            continue
        se = (se_a**2 + se_b**2) ** 0.5
        found[name] = Interval(delta - z * se, delta + z * se, se)
    return found


class Task(Protocol):
    name: str
    model_class: Any
    peft_task_type: str | None

    def prepare_data(self) -> dict[str, Any]:
        """Load data and tokenizers; returns record fields describing the data."""

    def train_batches(self, seed: int) -> Iterator[Batch]:
        """An endless, seeded stream of training batches."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of one batch."""

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        """Quality metrics on the held-out split, their intervals and the non-finite outputs met."""

    def differences(self, a: Evaluation, b: Evaluation) -> tuple[dict[str, Interval], str]:
        """The interval of `a - b` per metric (two evaluations of this task's eval set), and how it was made."""


class TaskBase:
    """What every task holds: the suite it runs (and the file it came from), the model's folder, the device."""

    name: str
    model_class_name: str  # the transformers class that loads the base, e.g. CLIPModel

    def __init__(self, loaded_suite: LoadedSuite, model_path: str, device: str):
        import transformers

        self.loaded_suite = loaded_suite
        self.suite = loaded_suite.suite
        self.model_class = getattr(transformers, self.model_class_name)
        self.model_path = model_path
        self.device = device
        self.data_read: dict[str, str] = {}  # suite key -> sha256 of its data file as prepare_data read it

    def differences(self, a: Evaluation, b: Evaluation) -> tuple[dict[str, Interval], str]:
        """The interval of `a - b` per metric, unpaired (a task with per-unit scores pairs them instead)."""
        return unpaired_differences(a, b), UNPAIRED_METHOD


def endless(loader: Any) -> Iterator[Any]:
    """Iterate a DataLoader epoch after epoch (a seeded sampler reshuffles each epoch)."""
    while True:
        produced = False
        for item in loader:
            produced = True
            yield item
        if not produced:
            raise ValueError("the training data yields no batch (fewer examples than one batch?)")
