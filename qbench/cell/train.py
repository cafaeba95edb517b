"""The single LoRA training loop, the same for every task and precision."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qbench.cell.measure.timing import StepTimer
from qbench.cell.tasks.batch import Batch
from qbench.contract import optimizers

if TYPE_CHECKING:
    from qbench.contract.suite import TrainSpec


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


# the most points a record's loss curve holds: a longer run stores the mean of each run of consecutive steps
LOSS_CURVE_POINTS = 500


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> tuple[list[float], int]:
    """(the curve, steps per point): every step's loss while there are at most `points` steps, else the mean
    loss of each interval of `ceil(steps / points)` consecutive steps (the last interval may be shorter), so
    that a record of 100,000 steps stays small and still shows the whole fine-tune."""
    every = max(1, math.ceil(len(losses) / points))
    if every == 1:
        return list(losses), 1
    return [math.fsum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)], every


@dataclass
class TrainResult:
    final_loss: float
    first_loss: float
    losses: list[float]


# one optimizer step's backward passes over its micro-batches: returns (the step's loss, samples, tokens)
Accumulate = Callable[[torch.nn.Module, Iterator[Batch]], tuple[float, int, int]]


def mean_of_micro_batches(loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor], micro_batches: int) -> Accumulate:
    """Gradient accumulation as every trainer does it: each micro-batch's loss over `micro_batches`, backward one
    micro-batch at a time (a contrastive loss then sees only its own micro-batch's negatives)."""

    def step(model: torch.nn.Module, batches: Iterator[Batch]) -> tuple[float, int, int]:
        step_loss, samples, tokens = 0.0, 0, 0
        for _ in range(micro_batches):
            batch = next(batches)
            loss = loss_fn(model, batch) / micro_batches
            loss.backward()
            step_loss += loss.item()
            samples += batch.samples
            tokens += batch.tokens
        return step_loss, samples, tokens

    return step


def build_optimizer(chosen: optimizers.Optimizer, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """`chosen` (a registry entry of qbench.contract.optimizers) over `params` with the suite's learning rate and
    weight decay, every other hyperparameter at its library's default (betas (0.9, 0.999) and eps 1e-8 for the
    AdamW kinds)."""
    if chosen.library == "torch":
        return getattr(torch.optim, chosen.class_name)(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes

    return getattr(bitsandbytes.optim, chosen.class_name)(params, lr=lr, weight_decay=weight_decay)


def train(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    config: TrainSpec,
    timer: StepTimer,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    on_first_step: Callable[[torch.optim.Optimizer], None] = lambda optimizer: None,
    accumulate: Accumulate | None = None,
) -> TrainResult:
    """Run `config.steps` optimizer steps of `config.optimizer` (a name of `qbench.contract.optimizers`,
    AdamW by default) with a transformers schedule and gradient accumulation over `config.grad_accum`
    micro-batches (`accumulate`: how a task accumulates, by default `mean_of_micro_batches`). `on_first_step`
    sees the optimizer once, right after its first step, when its state exists."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    chosen = optimizers.get(getattr(config, "optimizer", optimizers.DEFAULT))
    optimizer = build_optimizer(chosen, trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    accumulate = accumulate or mean_of_micro_batches(loss_fn, config.grad_accum)
    model.train()
    losses: list[float] = []
    for step in range(config.steps):
        timer.start()
        step_loss, samples, tokens = accumulate(model, batches)
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(f"training loss is {step_loss} at step {step + 1}")
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        if step == 0:
            on_first_step(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop(samples, tokens)
        losses.append(step_loss)
        on_step(step + 1, step_loss)
    return TrainResult(final_loss=losses[-1], first_loss=losses[0], losses=losses)
