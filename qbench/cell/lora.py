"""LoRA on the frozen base: the suite's k-bit preparation, then peft's adapters, initialised alike in every arm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qbench.contract.suite import Suite


def prepare(model: torch.nn.Module, suite: Suite) -> torch.nn.Module:
    """The base prepared as the suite says: `train.prepare = "peft-kbit"` runs peft's
    prepare_model_for_kbit_training (every 16-bit parameter that is not 4-bit is cast to float32, input
    gradients on, gradient checkpointing as `train.gradient_checkpointing` says); "none" changes nothing
    but gradient checkpointing. What the base became is read back afterwards (`readback.inspect_trained_base`)."""
    from peft import prepare_model_for_kbit_training

    if suite.train.prepare == "peft-kbit":
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=suite.train.gradient_checkpointing)
    if suite.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def attach(model: torch.nn.Module, suite: Suite, peft_task_type: str | None, seed: int) -> Any:
    """LoRA adapters on `lora.target_modules` of the prepared base; the seed is set just before, so every
    arm starts from the same adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

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
