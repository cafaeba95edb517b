"""LoRA on the frozen base: the suite's k-bit preparation, then peft's adapters, initialised alike in every arm,
and the trained adapter saved as a user shares it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.contract import inits

ADAPTER_NAME = "default"  # peft's name for the one adapter qbench attaches

if TYPE_CHECKING:
    import torch

    from qbench.contract.precisions import Precision
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


def config(suite: Suite, peft_task_type: str | None, precision: Precision | None = None) -> Any:
    """peft's LoraConfig for the suite's `lora` settings and init (LoftQ fits the arm's bits: 8 for int8, else 4)."""
    from peft import LoraConfig

    lora, init = suite.lora, inits.get(suite.lora.init)
    extra: dict[str, Any] = {}
    if init.name == "eva":
        from peft import EvaConfig

        extra["eva_config"] = EvaConfig(rho=1.0)  # every layer keeps rank r: the same trainable parameters as other inits
    elif init.name == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method="ipm")
    elif init.name == "loftq":
        from peft import LoftQConfig

        bits = 8 if precision is not None and precision.kind == "int8" else 4
        extra["loftq_config"] = LoftQConfig(loftq_bits=bits, loftq_iter=1)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type=peft_task_type,
        init_lora_weights=init.peft_value,
        use_dora=lora.use_dora,
        **extra,
    )


def attach(model: torch.nn.Module, suite: Suite, peft_task_type: str | None, seed: int,
           calibration: Callable[[], Iterable[dict[str, Any]]] | None = None) -> Any:
    """LoRA adapters on `lora.target_modules` of the prepared base, initialised as `lora.init` says; the seed
    is set just before, so every arm starts from the same adapters. `calibration` yields the model inputs a
    data-driven init (eva) reads."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # the same LoRA initialisation in every arm
    model = get_peft_model(model, config(suite, peft_task_type))
    if suite.lora.init == "eva":
        from peft import initialize_lora_eva_weights

        if calibration is None:
            raise ValueError("lora.init = 'eva' reads calibration batches, and none were given")
        initialize_lora_eva_weights(model, dataloader=list(calibration()), show_progress_bar=False)
    return model


def attach_initialised(model: torch.nn.Module, adapter_folder: str | Path) -> Any:
    """The adapter an init made on the full-precision base (qbench.cell.inits), on this base (its residual, loaded in
    the arm's precision), trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_folder), is_trainable=True)


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


def save_initial(model: Any, folder: Path) -> None:
    """The adapter as initialised, before any step: what peft's conversion of a base-rewriting init subtracts."""
    model.save_pretrained(str(folder))


def save_adapter(model: Any, folder: Path, suite: Suite, initial: Path | None) -> dict[str, Any]:
    """Save the trained adapter in peft's layout (adapter_config.json + adapter_model.safetensors) into `folder`,
    in the form a user shares: for an init that rewrote the base (pissa, olora, corda) converted by peft
    (`path_initial_model_for_weight_conversion`) into a rank-2r LoRA for the original checkpoint, where peft can.
    Returns `adapter.*` and `weights.adapter_bytes` (the saved weights' bytes)."""
    init = inits.get(suite.lora.init)
    converted = init.rewrites_base and initial is not None and not suite.lora.use_dora and init.name != "loftq"
    if converted:
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(initial))
        base = "the original checkpoint: peft converted it (rank 2r: the trained B·A less the initial B0·A0)"
    else:
        model.save_pretrained(str(folder))
        base = "the base as loaded for this cell" if not init.rewrites_base else _unconverted_base(init, suite)
    weights = sorted(Path(folder).glob("adapter_model.*"))
    return {
        "weights.adapter_bytes": sum(p.stat().st_size for p in weights),
        "adapter.converted": converted,
        "adapter.applies_to": base,
    }


def _unconverted_base(init: inits.Init, suite: Suite) -> str:
    if init.name == "loftq":
        return ("the quantized base LoftQ fitted B0·A0 to (this arm's), not the original checkpoint: LoftQ's adapter "
                "corrects that quantization, and peft's conversion does not cover it")
    return (f"the rewritten base of lora.init = {init.name!r} (W - B0·A0 in the arm's precision), not the original "
            "checkpoint: peft converts no DoRA adapter (its magnitudes were trained against the rewritten base)")
