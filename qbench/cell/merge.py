"""Merging the trained adapter into the base, as users ship it, and how much of the adapter a re-quantizing merge kept.

Two merges, each evaluated by the task like the unmerged adapter:

- `dequantized`: every quantized linear of the base dequantized into a dense compute-dtype copy, and each LoRA
  layer's merged weight (peft's own formula, DoRA's included, applied in float32 to the dequantized stored
  weight) stored there: what a user gets by dequantizing the base and merging into it.
- `requantized`: peft's merge on the arm's own base (the merge `merge_and_unload` runs), which stores the merged
  weight in the arm's precision again (bitsandbytes quantizes it anew; a dense base rounds it to its dtype).

Both read the stored codes and absmax themselves (bitsandbytes' dequantize functions on the weight's data and
quant_state), never a weight bitsandbytes repacked for its CPU kernel: qbench turns that repacking off on every
layer as the base is loaded (cell.models.disable_bnb_cpu_weight_packing), so a merge after an evaluation reads
what a merge before it reads.

What a re-quantizing merge kept of the adapter, per LoRA layer and over all of them (`Erasure`): the share of
stored codes it left unchanged, the correlation between the weight change that survived,
dequant(requant(W + ΔW)) - dequant(Q), and the intended ΔW (merged - dequant(Q)), the error of the survived
change relative to ΔW, and the RMS of ΔW over the RMS of the quantization step at each weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qbench.cell.lora import ADAPTER_NAME as ADAPTER
from qbench.contract.intervals import NO_DIFFERENCE


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, layer) of every peft LoRA layer holding qbench's adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {})]


def base_name(name: str) -> str:
    """A LoRA layer's module name as the base model's checkpoint names it (peft's wrappers stripped)."""
    return name.removeprefix("base_model.model.")


@dataclass(frozen=True)
class StoredWeight:
    """A linear's weight as it is stored: the codes (4-bit code indices, int8 values, or a dense weight's bits),
    the value each code stands for (float32, the weight's shape) and the quantization step at each weight (float32,
    the distance to the neighbouring codes: block absmax x the code table's spacing for 4-bit, the row's absmax / 127
    for int8, the dtype's spacing for a dense weight)."""

    codes: torch.Tensor
    values: torch.Tensor
    step: torch.Tensor


def _spacing(levels: torch.Tensor) -> torch.Tensor:
    """Per code of a code table: half the distance between the codes on either side of its value (one side at the
    ends), from the table's distinct values in order."""
    distinct = torch.unique(levels.float())
    gaps = distinct[1:] - distinct[:-1]
    half = torch.cat([gaps[:1], (gaps[1:] + gaps[:-1]) / 2, gaps[-1:]])
    return half[torch.searchsorted(distinct, levels.float())]


def stored_weight(layer: nn.Module) -> StoredWeight:
    """The stored codes, values and step of a linear (bitsandbytes Linear4bit or Linear8bitLt, or a dense one)."""
    weight = layer.weight
    kind = type(layer).__name__
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf

        state = weight.quant_state
        packed = weight.data.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[: state.shape.numel()].long()
        absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested else state.absmax
        scale = absmax.float().repeat_interleave(state.blocksize)[: codes.numel()]
        table = state.code.float().to(codes.device)
        values = bnbf.dequantize_4bit(weight.data, state).float()
        return StoredWeight(codes, values, (scale * _spacing(table)[codes]).reshape(state.shape))
    if kind == "Linear8bitLt":
        import bitsandbytes.functional as bnbf

        # bitsandbytes moves the row scales from the weight to the layer's state at the first forward pass
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        row_step = scales.float() / 127
        values = bnbf.int8_vectorwise_dequant(weight.data, scales).float()
        return StoredWeight(weight.data.reshape(-1).clone(), values, row_step[:, None].expand_as(values))
    data = weight.detach()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()]
    step = (torch.nextafter(data, torch.full_like(data, math.inf)) - data).float()
    return StoredWeight(data.reshape(-1).view(bits).clone(), data.to(torch.float32, copy=True), step)


def merged_weight(layer: Any, stored: torch.Tensor | None = None) -> torch.Tensor:
    """The weight the LoRA layer computes with, merged, in float32: peft's merge formula (DoRA's merge_safe for a
    DoRA layer, else stored + get_delta_weight) applied to the dequantized stored base weight."""
    base = stored if stored is not None else stored_weight(layer.get_base_layer()).values
    with torch.no_grad():
        variant = getattr(layer, "lora_variant", {}).get(ADAPTER)
        if variant is not None:
            return variant.merge_safe(layer, ADAPTER, base).float()
        return base + layer.get_delta_weight(ADAPTER).float()


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    linear.requires_grad_(False)
    return linear


def _quantized_linears(model: nn.Module, skip: set[int]) -> list[str]:
    from qbench.cell.measure.weights import is_bnb_linear

    return [name for name, module in model.named_modules() if is_bnb_linear(module) and id(module) not in skip]


@contextmanager
def dequantized_copy(model: nn.Module, compute_dtype: str) -> Iterator[dict[str, Any]]:
    """Within the block the model computes with dense `compute_dtype` linears: each LoRA layer replaced by its merged
    weight (merged_weight) and every other quantized linear by its dequantized weight; the original modules come back
    afterwards, untouched. Yields the record fields saying how the merge was made."""
    dtype = getattr(torch, compute_dtype)
    layers = lora_layers(model)
    wrapped = {id(layer.get_base_layer()) for _, layer in layers}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                parent, child = _parent(model, name)
                swapped.append((parent, child, layer))
                setattr(parent, child, _dense_linear(merged_weight(layer), layer.get_base_layer().bias, dtype))
            for name in _quantized_linears(model, wrapped):
                parent, child = _parent(model, name)
                module = getattr(parent, child)
                swapped.append((parent, child, module))
                setattr(parent, child, _dense_linear(stored_weight(module).values, module.bias, dtype))
        yield {
            "merge.dequantized.how": (
                f"{len(layers)} LoRA layer(s) merged by peft's formula (get_delta_weight; DoRA: merge_safe) in float32 "
                f"into their dequantized stored weight, {len(swapped) - len(layers)} other quantized linear(s) "
                f"dequantized; all stored as dense {compute_dtype} linears, nothing quantized again"),
            "merge.dequantized.layers": len(layers),
        }
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


@dataclass
class _Pooled:
    """Sums over many layers' weights, for figures over all of them at once."""

    count: int = 0
    unchanged: int = 0
    s: float = 0.0
    i: float = 0.0
    ss: float = 0.0
    ii: float = 0.0
    si: float = 0.0
    error: float = 0.0
    step: float = 0.0

    def add(self, codes_kept: torch.Tensor, survived: torch.Tensor, intended: torch.Tensor, step: torch.Tensor) -> None:
        s, i = survived.double().reshape(-1), intended.double().reshape(-1)
        self.count += s.numel()
        self.unchanged += int(codes_kept.sum())
        self.s, self.i = self.s + float(s.sum()), self.i + float(i.sum())
        self.ss, self.ii, self.si = self.ss + float(s @ s), self.ii + float(i @ i), self.si + float(s @ i)
        self.error += float(((s - i) ** 2).sum())
        self.step += float((step.double() ** 2).sum())

    def figures(self) -> dict[str, float | None]:
        n = self.count
        if not n:
            return dict.fromkeys(("unchanged_code_share", "delta_correlation", "delta_error_rel", "delta_rms_to_step"))
        covariance = self.si - self.s * self.i / n
        spread = (self.ss - self.s**2 / n) * (self.ii - self.i**2 / n)
        return {
            "unchanged_code_share": self.unchanged / n,
            # undefined when nothing survived (or nothing was intended): a constant has no correlation
            "delta_correlation": covariance / math.sqrt(spread) if spread > 0 else None,
            "delta_error_rel": math.sqrt(self.error / self.ii) if self.ii > 0 else None,
            "delta_rms_to_step": math.sqrt(self.ii / self.step) if self.step > 0 else None,
        }


@dataclass
class Erasure:
    """What a re-quantizing merge kept of the adapter, per LoRA layer (lists in layer order) and over all of them."""

    names: list[str] = field(default_factory=list)
    per_layer: dict[str, list[float | None]] = field(default_factory=dict)
    total: _Pooled = field(default_factory=_Pooled)

    def add(self, name: str, before: StoredWeight, after: StoredWeight, intended: torch.Tensor) -> None:
        kept = before.codes == after.codes
        survived = after.values - before.values
        one = _Pooled()
        one.add(kept, survived, intended, before.step)
        self.total.add(kept, survived, intended, before.step)
        self.names.append(name)
        for key, value in one.figures().items():
            self.per_layer.setdefault(key, []).append(value)

    def record(self, prefix: str) -> dict[str, Any]:
        fields: dict[str, Any] = {f"{prefix}.{k}": v for k, v in self.total.figures().items()}
        fields[f"{prefix}.layers"] = len(self.names)
        fields.update({f"per_layer.{prefix.replace('.', '_')}_{k}": v for k, v in self.per_layer.items()})
        return fields


def requantize(model: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Merge the adapter into the arm's own base with peft (each LoRA layer's `merge`, then `merge_and_unload`:
    the merged weight stored in the arm's precision again) and measure, layer by layer, what the merge kept of
    the adapter. Returns the merged model (the peft wrappers gone) and the `merge.requantized.*` fields."""
    import warnings

    erasure = Erasure()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(rounding errors|[Aa]lready).*")  # peft's notes on what is measured here
        for name, layer in lora_layers(model):
            before = stored_weight(layer.get_base_layer())
            intended = merged_weight(layer, before.values) - before.values
            layer.merge(adapter_names=[ADAPTER])
            erasure.add(base_name(name), before, stored_weight(layer.get_base_layer()), intended)
            del before, intended
        merged = model.merge_and_unload()
    fields = erasure.record("merge.requantized")
    fields["merge.requantized.how"] = (
        f"peft's merge of each of the {len(erasure.names)} LoRA layer(s) into the cell's own base, then "
        "merge_and_unload: peft dequantizes the stored weight, adds the adapter's delta (DoRA: merge_safe) and "
        "stores the sum in the base's own format again (bitsandbytes quantizes it anew; a dense base rounds it to "
        "its dtype)")
    fields["per_layer.merge_requantized_modules"] = erasure.names
    return merged, fields


# the figures a merge is judged on against the unmerged adapter (the ones a report leads with), where the task has them
JUDGED = ("mean_recall@1", "perplexity", "bits_per_byte")


def verdict(delta: float, low: float | None, high: float | None, direction: str | None) -> str | None:
    """"identical" (equal figures), NO_DIFFERENCE (the difference's interval holds 0), "better" / "worse" (it
    does not), "differs" (no better direction), None when there is no interval to judge by."""
    if delta == 0:
        return "identical"
    if low is None or high is None:
        return None
    if low <= 0 <= high:
        return NO_DIFFERENCE
    if direction is None:
        return "differs"
    return "better" if (delta > 0) == (direction == "higher") else "worse"


def judged(task: Any, merged: Any, unmerged: Any, which: str) -> dict[str, Any]:
    """`merge.<which>.<metric>_delta|_delta_low|_delta_high|_verdict`: the merged model's figure minus the unmerged
    adapter's, on the same eval set, its interval (paired over eval units where the task can) and a word for it."""
    from qbench.contract.fields import spec_for

    differences, method = task.differences(merged, unmerged)
    fields: dict[str, Any] = {"merge.verdict_method": method}
    for name in JUDGED:
        if name not in merged.metrics or name not in unmerged.metrics:
            continue
        prefix = f"merge.{which}.{name}_"
        delta = merged.metrics[name] - unmerged.metrics[name]
        interval = differences.get(name)
        low, high = (interval.low, interval.high) if interval is not None else (None, None)
        spec = spec_for(f"quality.eval_after.{name}")
        fields.update({
            prefix + "delta": None if math.isnan(delta) else delta,
            prefix + "delta_low": low,
            prefix + "delta_high": high,
            prefix + "verdict": verdict(delta, low, high, spec.direction if spec else None),
        })
    return fields
