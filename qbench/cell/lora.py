"""LoRA on the frozen base: the suite's k-bit preparation, then peft's adapters, initialised alike in every arm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qbench.contract.suite import Suite


# every arm recomputes its checkpointed layers the same way: torch's non-reentrant checkpoint, which passes the
# gradient to the adapters inside a layer whether or not the layer's inputs require one (transformers' own default;
# peft's k-bit preparation would otherwise ask torch for its reentrant default)
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def prepare(model: torch.nn.Module, suite: Suite) -> torch.nn.Module:
    """The base prepared as the suite says: `train.prepare = "peft-kbit"` runs peft's
    prepare_model_for_kbit_training (every 16-bit parameter that is not 4-bit is cast to float32, input
    gradients on); "none" changes nothing. Gradient checkpointing as `train.gradient_checkpointing` says, in
    every arm: peft's preparation turns it on for k-bit bases only, so a dense arm gets it here. What the base
    became is read back afterwards (`readback.inspect_trained_base`, `checkpointing_fields`)."""
    from peft import prepare_model_for_kbit_training

    checkpointing = suite.train.gradient_checkpointing
    if suite.train.prepare == "peft-kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    if checkpointing and not _checkpointing_on(model):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    return model


def _checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


class SettingNotApplied(RuntimeError):
    """A suite setting that the libraries did not apply to this model (the record says which)."""


def checkpointing_fields(model: torch.nn.Module, suite: Suite) -> dict[str, Any]:
    """`train.gradient_checkpointing_layers`: how many of the model's layers recompute their activations in the
    backward pass (0 without checkpointing). SettingNotApplied when the suite asks for checkpointing and no
    layer does it (a model without support would otherwise train as if the setting were off)."""
    layers = sum(1 for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True
                 and _is_checkpointed_layer(module))
    fields = {"train.gradient_checkpointing_layers": layers,
              "train.gradient_checkpointing_mode": "torch non-reentrant checkpoint" if layers else None}
    if suite.train.gradient_checkpointing and not layers:
        raise SettingNotApplied("train.gradient_checkpointing = true, but no layer of the model checkpoints its activations")
    return fields


def _is_checkpointed_layer(module: torch.nn.Module) -> bool:
    """A repeated block that recomputes itself (transformers' GradientCheckpointingLayer), not the model or stack
    that only carries the flag."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: every module but the pretrained models carrying the flag
        from transformers import PreTrainedModel

        return not isinstance(module, PreTrainedModel)
    return isinstance(module, GradientCheckpointingLayer)


def params_without_grad(model: torch.nn.Module) -> list[str]:
    """Trainable parameters that the last backward pass gave no gradient: adapters outside the loss's graph."""
    return [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]


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


def counts(model: torch.nn.Module) -> dict[str, Any]:
    """`params.trainable` (LoRA parameters, and biases if the suite trains them), `params.lora_modules`, and
    `lora.adapter_dtypes`: what the trainable parameters are stored in (peft keeps 16-bit adapters in float32
    unless told otherwise, whatever the compute dtype)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {
        "params.trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params.lora_modules": sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A")),
        "lora.adapter_dtypes": ",".join(dtypes) or None,
    }
