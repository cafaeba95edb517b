"""Inits that decompose the full-precision base (PiSSA, CorDA, LoftQ): run peft's init on the checkpoint in float32,
then keep the rewritten base as a checkpoint folder the arm loads in its own precision, and the initial adapter.

peft refuses a quantized weight for PiSSA and CorDA ("initialize PiSSA under float32 ... Subsequently, re-quantize
the residual model"), and LoftQ quantizes inside its own loop: each starts from the checkpoint's W, writes
W − B0·A0 (LoftQ: its quantized Q) into the base, and the adapter B0, A0 beside it. Done in float32 from the same
checkpoint for every arm, every arm starts from the same B0, A0; only the residual's storage differs by arm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.cell import lora, models
from qbench.contract import inits, precisions

if TYPE_CHECKING:
    from qbench.contract.precisions import Precision
    from qbench.contract.suite import Suite

RESIDUAL_FOLDER = "rewritten-base"
INITIAL_ADAPTER_FOLDER = "initial-adapter"


def decompose(model_class: Any, checkpoint: str, suite: Suite, precision: Precision, peft_task_type: str | None,
              device: str, seed: int, folder: Path,
              calibration: Callable[[], Iterable[dict[str, Any]]] | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """Run `lora.init` on the checkpoint loaded dense in float32; save the rewritten base into `folder`/rewritten-base
    (safetensors, as save_pretrained writes a checkpoint) and the initial adapter into `folder`/initial-adapter.
    Returns both folders and the `lora_init.*` fields saying what was done. `calibration` yields the model inputs
    CorDA reads to estimate each layer's input covariance."""
    import torch
    from peft import get_peft_model

    init = inits.get(suite.lora.init)
    model = models.load_base(model_class, checkpoint, precisions.get("fp32"), "float32", device, suite.model)
    config = lora.config(suite, peft_task_type, precision)
    torch.manual_seed(seed)
    if init.name == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        if calibration is None:
            raise ValueError("lora.init = 'corda' reads calibration batches, and none were given")
        batches = list(calibration())
        model.eval()

        def run_model() -> None:  # one sequence per forward: peft's covariance hook takes a batch of one
            with torch.no_grad():
                for inputs in batches:
                    for row in range(len(next(iter(inputs.values())))):
                        model(**{key: value[row : row + 1] for key, value in inputs.items()})

        preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    # loaded again onto the rewritten base, the adapter must not be decomposed a second time: peft's own advice
    peft_model.peft_config[lora.ADAPTER_NAME].init_lora_weights = True
    initial = folder / INITIAL_ADAPTER_FOLDER
    lora.save_initial(peft_model, initial)
    residual = folder / RESIDUAL_FOLDER
    peft_model.unload().save_pretrained(str(residual))
    return residual, initial, {
        "lora_init.base": (f"the checkpoint decomposed in float32 by peft ({init.name}), the rewritten base "
                           f"{'(its quantized Q) ' if init.name == 'loftq' else '(W - B0·A0) '}saved and loaded in the "
                           f"arm's precision ({precision.name})"),
    }
