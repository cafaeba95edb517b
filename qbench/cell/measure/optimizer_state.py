"""Exact bytes of an optimizer's state (after its first step), by dtype, and whether paging is in effect."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbench.contract.optimizers import BNB_PAGING_MIN_ELEMENTS

if TYPE_CHECKING:
    import torch

    from qbench.contract.optimizers import Optimizer

# dtypes every record names, 0 when absent, so that 32-bit and 8-bit optimizers have the same columns
ALWAYS_SHOWN_DTYPES = ("float32", "uint8")


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer's state holds, each storage once: bitsandbytes' 8-bit optimizers share
    one quantization map (`qmap1`, `qmap2`) between all parameters, and it is in memory once."""
    import torch

    seen: set[tuple[str, int]] = set()
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue  # bitsandbytes keeps `step` as a Python int; torch's AdamW as a tensor
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            if storage.nbytes() and key in seen:
                continue
            seen.add(key)
            tensors.append(value)
    return tensors


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _moment_dtype(state: dict[str, Any]) -> str | None:
    """The dtype a parameter's first moment is kept in (torch: exp_avg; bitsandbytes: state1)."""
    moment = state.get("exp_avg", state.get("state1"))
    return str(moment.dtype).removeprefix("torch.") if moment is not None and hasattr(moment, "dtype") else None


def paging_reason(spec: Optimizer, device: str, paged_bytes: int, largest_param: int) -> str | None:
    """Why paging is not in effect, or None when some state is paged."""
    if paged_bytes:
        return None
    if not spec.paged:
        return f"{spec.name} is not a paged optimizer"
    if not device.startswith("cuda"):
        return (f"bitsandbytes pages optimizer state only on CUDA; on {device.split(':')[0]} the state stays in "
                "ordinary memory (bitsandbytes warns 'Paged optimizers are not supported on CPU')")
    return (f"bitsandbytes pages only the state of parameters with at least {BNB_PAGING_MIN_ELEMENTS:,} elements; "
            f"the largest trainable parameter here has {largest_param:,}")


def describe(optimizer: torch.optim.Optimizer, spec: Optimizer, device: str) -> dict[str, Any]:
    """`optimizer.*` of the record: what was built (class, betas, eps, learning rate, weight decay) and,
    read after the first step (when the state exists), the exact state bytes by dtype (each storage
    once), how many parameters have 8-bit and 32-bit moments, and whether paging is in effect."""
    group = optimizer.param_groups[0]
    betas = group.get("betas") or (None, None)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors = _state_tensors(optimizer)
    by_dtype: dict[str, int] = dict.fromkeys(ALWAYS_SHOWN_DTYPES, 0)
    for tensor in tensors:
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + _bytes(tensor)
    moments = [_moment_dtype(optimizer.state[p]) for p in params if p in optimizer.state]
    paged_bytes = sum(_bytes(t) for t in tensors if getattr(t, "is_paged", False))
    largest = max((p.numel() for p in params), default=0)
    return {
        **{f"optimizer.{key}": value for key, value in spec.settings().items()},
        "optimizer.class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "optimizer.beta1": betas[0],
        "optimizer.beta2": betas[1],
        "optimizer.eps": group.get("eps"),
        "optimizer.lr": group.get("initial_lr", group.get("lr")),
        "optimizer.weight_decay": group.get("weight_decay"),
        "optimizer.params": len(params),
        "optimizer.params_with_8bit_state": sum(1 for d in moments if d == "uint8"),
        "optimizer.params_with_32bit_state": sum(1 for d in moments if d == "float32"),
        "optimizer.largest_param_elements": largest,
        "optimizer.state_tensors": len(tensors),
        "optimizer.state_bytes": sum(by_dtype.values()),
        **{f"optimizer.state.{name}_bytes": value for name, value in by_dtype.items()},
        "optimizer.paged": paged_bytes > 0,
        "optimizer.paged_state_bytes": paged_bytes,
        "optimizer.paged_reason": paging_reason(spec, device, paged_bytes, largest),
    }
