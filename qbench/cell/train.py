"""The single LoRA training loop, the same for every task and precision."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qbench.measure.timing import StepTimer
from qbench.tasks.batch import Batch

if TYPE_CHECKING:
    from qbench.suite.spec import TrainSpec


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    final_loss: float
    first_loss: float
    losses: list[float]


def train(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    config: TrainSpec,
    timer: StepTimer,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    on_first_step: Callable[[torch.optim.Optimizer], None] = lambda optimizer: None,
) -> TrainResult:
    """Run `config.steps` optimizer steps of `config.optimizer` (a name of `qbench.suite.optimizers`,
    AdamW by default) with a transformers schedule and gradient accumulation. `on_first_step` sees the
    optimizer once, right after its first step, when its state exists."""
    from transformers import get_scheduler

    from qbench.suite import optimizers

    trainable = [p for p in model.parameters() if p.requires_grad]
    chosen = optimizers.get(getattr(config, "optimizer", optimizers.DEFAULT))
    optimizer = chosen.build(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    model.train()
    losses: list[float] = []
    for step in range(config.steps):
        timer.start()
        step_loss, samples, tokens = 0.0, 0, 0
        for _ in range(config.grad_accum):
            batch = next(batches)
            loss = loss_fn(model, batch) / config.grad_accum
            loss.backward()
            step_loss += loss.item()
            samples += batch.samples
            tokens += batch.tokens
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
