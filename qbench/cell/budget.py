"""A cell of a suite with a [fit] table: its memory held to the budget, and the record's verdict on it.

The figure judged, per device (docs/fit.md):

- cpu:  `memory.all_phases.torch_cpu_increase_peak_bytes`, the bytes torch's tensors held at the cell's peak above
        what they held at the process baseline (qbench.cell.measure.tensor_bytes), over every phase from
        loading the base to the last evaluation. Nothing enforces it: the cell runs to its end, and the
        record says whether its peak was within the budget.
- cuda: torch's peak reserved bytes over the phases above the process baseline's. The process is capped at
        the budget (torch.cuda.set_per_process_memory_fraction: a smaller card, emulated), so a cell that
        needs more fails with out-of-memory, and that too is recorded as over the budget.
"""

from __future__ import annotations

import os
from typing import Any

CPU_FIGURE = "memory.all_phases.torch_cpu_increase_peak_bytes"
CPU_SOURCE = "torch CPU tensor bytes at the peak, above the process baseline (memory.all_phases.torch_cpu_increase_peak_bytes)"
CUDA_SOURCE = ("torch peak reserved bytes above the process baseline (memory.all_phases.torch_reserved_peak_bytes - "
               "memory.process_baseline.torch_reserved_bytes), under a cap at the budget")
OUT_OF_MEMORY = ("OutOfMemoryError", "MemoryError")


def tracks(suite: Any) -> bool:
    """Whether the cell measures the figure fit judges (a suite with a [fit] table)."""
    return getattr(suite, "fit", None) is not None


def before_load(suite: Any, device: str) -> dict[str, Any]:
    """Set the cell up to be judged against the suite's budget; the record fields that say how.

    On a CPU transformers loads weights in this thread (HF_DEACTIVATE_ASYNC_LOAD), so that every tensor is
    counted; on CUDA the process is capped at the budget."""
    if not tracks(suite):
        return {}
    fields: dict[str, Any] = {}
    if not device.startswith("cuda"):
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        fields["fit.load_threads"] = "sequential (HF_DEACTIVATE_ASYNC_LOAD=1): every tensor allocated where it is counted"
        return fields
    budget = suite.fit.budget_bytes
    if budget is None:
        return {"fit.device_cap": "none: the suite's [fit] table gives no budget"}
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"fit.device_total_bytes": total, "fit.device_cap_fraction": fraction,
            "fit.device_cap": f"torch.cuda.set_per_process_memory_fraction({fraction:.6f}): a {budget:,}-byte card emulated"}


def judged_bytes(record: dict[str, Any], device: str) -> tuple[int | None, str]:
    """(the figure fit judges, which it is); None when the record lacks it."""
    if device.startswith("cuda"):
        peak, base = record.get("memory.all_phases.torch_reserved_peak_bytes"), record.get("memory.process_baseline.torch_reserved_bytes")
        return (None if peak is None else peak - (base or 0)), CUDA_SOURCE
    return record.get(CPU_FIGURE), CPU_SOURCE


def verdict(record: dict[str, Any], suite: Any, device: str) -> dict[str, Any]:
    """`fit.*`: the budget, the margin, the limit they make, the figure judged and whether it is within the limit
    (True / False / None with `fit.verdict_reason` when it cannot be said)."""
    if not tracks(suite):
        return {}
    budget, margin = suite.fit.budget_bytes, suite.fit.margin
    figure, source = judged_bytes(record, device)
    fields: dict[str, Any] = {
        "fit.budget_bytes": budget,
        "fit.margin": margin,
        "fit.limit_bytes": None if budget is None else int(budget * (1 - margin)),
        "fit.peak_bytes": figure,
        "fit.peak_source": source,
        "fit.within_budget": None,
    }
    status = record.get("status")
    if budget is None:
        fields["fit.verdict_reason"] = "no budget: the suite's [fit] table gives none (qbench fit --budget sets one)"
    elif status != "ok" and record.get("error_type") in OUT_OF_MEMORY:
        fields["fit.within_budget"] = False
        fields["fit.verdict_reason"] = f"ran out of memory ({record.get('error_type')}) in phase {record.get('error_phase')}"
    elif status != "ok":
        fields["fit.verdict_reason"] = f"the cell did not finish ({status}: {record.get('error_type')}), so its peak is unknown"
    elif figure is None:
        fields["fit.verdict_reason"] = f"the figure judged was not measured ({source})"
    else:
        fields["fit.within_budget"] = figure <= fields["fit.limit_bytes"]
    return fields
