"""The one registry of LoRA initialisations: an init name -> how peft sets A, B (and maybe the base) before training.

peft's own default (`init_lora_weights=True`) is `kaiming` here: A drawn as torch's nn.Linear default
(Kaiming-uniform with a = sqrt(5), Microsoft's loralib), B zero, so B·A = 0 and the base is untouched.
`gaussian` is peft's "gaussian": A ~ N(0, (1/r)^2), B zero. The others start from the base's weights:

- pissa (Meng et al., 2024): the r principal singular triplets of W go into B·A, the residual
  W - B·A stays in the base. peft refuses a quantized weight, so qbench decomposes the checkpoint's
  full-precision W and stores the residual in the arm's precision (the paper's QPiSSA).
- olora (Büyükakyüz, 2024): QR of W; the first r columns of Q and rows of R become B and A. peft
  dequantizes a bitsandbytes weight itself, takes the QR of that, and quantizes the residual again.
- corda (Yang et al., 2024): SVD of W times the covariance of its inputs (calibration batches), the
  r components most tied to the task go into B·A (`ipm`); the residual is stored like PiSSA's.
- loftq (Li et al., 2023): alternates quantizing W - B·A and an SVD of what the quantization lost, so
  that Q + B·A is close to W. peft's loftq_init computes on CUDA or XPU only, and quantizes to NF4 or
  int8 (without double quantization) only; it sets B·A to that SVD unscaled, and the layer multiplies
  it by lora.alpha / lora.r, so Q + B·A fits W only at alpha = r (at alpha = 2r it overshoots by W - Q).
- eva (Paischer et al., 2024): A from the right singular vectors of each layer's inputs on training
  batches, B zero; the base is untouched. qbench keeps every layer at rank r (rho = 1).

Imports nothing: the parent checks suites with it before any cell, without torch or peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# how a cell builds the initialised adapter:
#   on-base       get_peft_model on the arm's loaded base (peft reads, and for olora rewrites, the arm's weights)
#   full-precision  on the checkpoint loaded in the compute dtype; the rewritten base (the residual) is then
#                 saved and loaded again in the arm's precision, so every arm starts from the same B·A
#   data          on the arm's loaded base, then peft's data-driven step over training batches
Route = Literal["on-base", "full-precision", "data"]

DEFAULT = "kaiming"
# training batches a data-driven init (eva, corda) reads before training, drawn from the cell's seeded stream
CALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class Init:
    """How the LoRA matrices (and, for some, the frozen base) are set before the first step."""

    name: str
    peft_value: str | bool  # LoraConfig(init_lora_weights=...)
    route: Route
    rewrites_base: bool  # the base the adapter trains on is W - B·A (then quantized), not W: the adapter alone is not
    # shareable, it is saved converted (peft's path_initial_model_for_weight_conversion)
    description: str
    devices: tuple[str, ...] = ()  # device types peft computes it on; () = every device
    precisions: tuple[str, ...] = ()  # the precisions it can quantize into; () = every one
    tasks: tuple[str, ...] = ()  # the tasks whose batches it can read; () = every one

    def settings(self) -> dict[str, object]:
        """Flat, JSON-friendly description for the record (`lora_init.*`)."""
        return {
            "name": self.name,
            "peft_value": str(self.peft_value),
            "route": self.route,
            "rewrites_base": self.rewrites_base,
            "description": self.description,
        }


REGISTRY: dict[str, Init] = {
    i.name: i
    for i in (
        Init("kaiming", True, "on-base", False,
             "peft's default (init_lora_weights=True): A Kaiming-uniform (a = sqrt 5, nn.Linear's default), B = 0"),
        Init("gaussian", "gaussian", "on-base", False, "peft's 'gaussian': A ~ N(0, (1/r)^2), B = 0"),
        Init("pissa", "pissa", "full-precision", True,
             "PiSSA: B·A = the r principal singular components of the full-precision W (exact SVD); the residual "
             "W - B·A is stored in the arm's precision (QPiSSA)"),
        Init("olora", "olora", "on-base", True,
             "OLoRA: B, A = the first r columns of Q and rows of R of the QR of the arm's (dequantized) W; "
             "peft quantizes the residual W - B·A again"),
        Init("corda", "corda", "full-precision", True,
             "CorDA (ipm): B·A = the r components of W·C (C: input covariance over calibration batches) most tied to "
             "the task; the residual is stored in the arm's precision", tasks=("causal_lm",)),
        Init("loftq", "loftq", "full-precision", True,
             "LoftQ (1 iteration): Q + B·A fitted to W, B·A = the SVD of what NF4 / int8 quantization lost",
             devices=("cuda", "xpu"), precisions=("nf4", "nf4-dq", "int8")),
        Init("eva", "eva", "data", False,
             "EVA: A = the right singular vectors of each layer's inputs over calibration batches, B = 0 "
             "(rank r in every layer: rho = 1)", tasks=("causal_lm",)),
    )
}


def get(name: str) -> Init:
    """The init called `name`; KeyError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown LoRA init {name!r}; known: {', '.join(REGISTRY)}") from None


def problems(init: Init, precision: str, task: str, device: str | None) -> list[str]:
    """Why `init` cannot run for this precision, task or device type, in words ([] when it can)."""
    found = []
    if device is not None and init.devices and device.split(":")[0] not in init.devices:
        found.append(f"peft computes {init.name} on {' or '.join(d.upper() for d in init.devices)} only, not on {device}")
    if init.precisions and precision not in init.precisions:
        found.append(f"peft's {init.name} fits the adapter to {', '.join(init.precisions)} only, not to {precision}")
    if init.tasks and task not in init.tasks:
        found.append(f"{init.name} reads calibration batches of a {' or '.join(init.tasks)} task, not {task}")
    return found
