"""The one registry of optimizers: an optimizer name -> how the LoRA parameters' optimizer is built.

`adamw` is torch's AdamW, qbench's default. The others are bitsandbytes' optimizers from QLoRA
(Dettmers et al., 2023; 8-bit states from Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization"): 8-bit state keeps each moment as one byte per element with a float32 absmax per
block of 256, about a quarter of 32-bit state; a paged optimizer allocates its state in CUDA unified
memory, which the driver moves to the CPU when the GPU runs short instead of failing with
out-of-memory. Paging exists only on CUDA: on any other device bitsandbytes keeps the state in
ordinary memory (and warns "Paged optimizers are not supported on CPU").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT = "adamw"

# bitsandbytes 0.50: a parameter with fewer elements keeps 32-bit state in an 8-bit optimizer
# (`min_8bit_size`, Optimizer2State/Optimizer1State.init_state) ...
BNB_MIN_8BIT_SIZE = 4096
# ... and a paged optimizer pages only the state of parameters with at least this many elements
# (Optimizer8bit.get_state_buffer: `p.numel() < 1e5` stays in ordinary device memory)
BNB_PAGING_MIN_ELEMENTS = 100_000


@dataclass(frozen=True)
class Optimizer:
    """How the trainable (LoRA) parameters are optimized; everything else about training is the suite's."""

    name: str
    library: Literal["torch", "bitsandbytes"]
    class_name: str  # attribute of torch.optim or bitsandbytes.optim
    description: str
    state_bits: int  # 32 or 8: the bits per element of each optimizer moment
    paged: bool = False  # state in CUDA unified memory (paged to the CPU under memory pressure)

    def settings(self) -> dict[str, object]:
        """Flat, JSON-friendly description for the record (`optimizer.*`)."""
        return {
            "name": self.name,
            "library": self.library,
            "state_bits": self.state_bits,
            "requests_paging": self.paged,
            "min_8bit_size": BNB_MIN_8BIT_SIZE if self.state_bits == 8 else None,
        }


REGISTRY: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer("adamw", "torch", "AdamW", "torch.optim.AdamW, 32-bit state (qbench's default)", 32),
        Optimizer("adamw8bit", "bitsandbytes", "AdamW8bit", "bitsandbytes AdamW, 8-bit block-wise state", 8),
        Optimizer("paged_adamw", "bitsandbytes", "PagedAdamW", "bitsandbytes AdamW, 32-bit state, paged (CUDA only)", 32,
                  paged=True),
        Optimizer("paged_adamw8bit", "bitsandbytes", "PagedAdamW8bit",
                  "bitsandbytes AdamW, 8-bit block-wise state, paged (CUDA only); QLoRA's optimizer", 8, paged=True),
        Optimizer("lion8bit", "bitsandbytes", "Lion8bit", "bitsandbytes Lion, one 8-bit moment (betas 0.9, 0.99)", 8),
    )
}


def get(name: str) -> Optimizer:
    """The optimizer called `name`; KeyError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(REGISTRY)}") from None
