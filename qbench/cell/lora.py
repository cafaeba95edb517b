"""LoRA on the frozen base: the suite's k-bit preparation, then peft's adapters, initialised alike in every arm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qbench.suite.spec import Suite


def attach(model: torch.nn.Module, suite: Suite, peft_task_type: str | None, seed: int) -> Any:
    """The base prepared as the suite says (`train.prepare`, `train.gradient_checkpointing`) with LoRA
    adapters on `lora.target_modules`; the seed is set just before, so every arm starts from the same adapters."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if suite.train.prepare == "peft-kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=suite.train.gradient_checkpointing)
    elif suite.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora = suite.lora
    torch.manual_seed(seed)  # the same LoRA initialisation in every arm
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type=peft_task_type,
    )
    return get_peft_model(model, config)


def counts(model: torch.nn.Module) -> dict[str, int]:
    """`params.trainable` (LoRA parameters, and biases if the suite trains them) and `params.lora_modules`."""
    return {
        "params.trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params.lora_modules": sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A")),
    }
