"""What a cell's tensors will hold, before any cell runs: the base's bytes in each precision, the LoRA adapters,
and the activations of one training step and one evaluation batch at given sizes.

- The base's bytes follow from the model's shapes and each format's layout (bitsandbytes' codes, absmax per
  block of 64, the nested absmax and code tables of double quantization, LLM.int8's row scales), the
  modules transformers keeps unquantized, and the buffers: the same sum qbench.cell.measure.weights makes
  of a loaded base, without loading it.
- The activations are found by running the task's own loss and backward (and one evaluation batch) on the
  meta device, where tensors have shapes but no memory and no arithmetic is done, while a dispatch mode adds
  up the bytes of every tensor created and subtracts them when it is freed: the peak is what the step holds
  above the model, its gradients included. Attention takes the kernel the device would (CPU: what
  torch's scaled_dot_product_attention picks for these inputs; CUDA: a flash kernel's memory).

Run as `python -m qbench.cell.estimate` with a JSON request on standard input; the answer is one JSON line.
"""

from __future__ import annotations

import json
import math
import sys
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qbench.contract import precisions
from qbench.contract.precisions import BNB_4BIT_BLOCKSIZE, Precision

NESTED_BLOCKSIZE = 256  # double quantization: one float32 absmax per 256 absmax bytes
NESTED_CODE_BYTES = 256 * 4  # the 8-bit code table of the nested absmax
FOUR_BIT_CODE_BYTES = 16 * 4  # the 16 values of NF4 / FP4
OFFSET_BYTES = 4
FLASH = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION


class LiveBytes(TorchDispatchMode):
    """Sums the bytes of every storage an operator creates, less those freed; `peak` is the highest sum.
    Storages that exist when it starts (`known`: the model's parameters and buffers) are never counted.

    A meta tensor has no values, so a model that asks one (transformers asks whether an attention mask is all
    ones, to skip building it) gets `mask_all_ones` for a yes-or-no question: True for a batch without
    padding (a causal LM's windows), False for padded captions (clip)."""

    def __init__(self, known: list[torch.Tensor], mask_all_ones: bool = True):
        super().__init__()
        self.mask_all_ones = mask_all_ones
        self.live = 0
        self.peak = 0
        self._seen: set[int] = {t.untyped_storage()._cdata for t in known}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype == torch.bool:
            return self.mask_all_ones
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item)
        return out


# -- the base's bytes -------------------------------------------------------------------------------------------


def quantized_weight_bytes(elements: int, rows: int, precision: Precision) -> int:
    """Bytes bitsandbytes keeps for one linear's weight of `elements` values (`rows` output features)."""
    if precision.kind == "int8":
        return elements + rows * 4  # int8 codes and a float32 scale per row
    blocks = math.ceil(elements / BNB_4BIT_BLOCKSIZE)
    codes = (elements + 1) // 2
    if not precision.double_quant:
        return codes + blocks * 4 + FOUR_BIT_CODE_BYTES
    nested = math.ceil(blocks / NESTED_BLOCKSIZE) * 4
    return codes + blocks + nested + NESTED_CODE_BYTES + FOUR_BIT_CODE_BYTES + OFFSET_BYTES


def kept_dense(model: nn.Module) -> list[str]:
    """The modules transformers leaves unquantized (output head, tied and last modules)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model))
    except Exception:  # a transformers without it: every linear counts as quantized
        return []


def _converted(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, skip))
    except ImportError:
        return not any(name == p or name.endswith("." + p) for p in skip)


def base_bytes(model: nn.Module, precision: Precision, compute_dtype: str) -> dict[str, int]:
    """`bytes` of the base in `precision` (every tensor once, tied ones too) and `largest_linear_bytes`, the
    largest quantized linear dequantized to the compute dtype (what a 4-bit or 8-bit forward holds for a moment)."""
    storage = torch.empty((), dtype=getattr(torch, precision.dense_dtype or compute_dtype)).element_size()
    compute = torch.empty((), dtype=getattr(torch, compute_dtype)).element_size()
    skip = kept_dense(model) if precision.quantized else []
    seen: set[int] = set()
    total = largest = 0
    for name, module in model.named_modules():
        quantize = precision.quantized and isinstance(module, nn.Linear) and _converted(name, skip)
        for key, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if quantize and key == "weight":
                total += quantized_weight_bytes(parameter.numel(), parameter.shape[0], precision)
                largest = max(largest, parameter.numel() * compute)
            else:
                total += parameter.numel() * (storage if parameter.is_floating_point() else parameter.element_size())
        for buffer in module.buffers(recurse=False):
            if id(buffer) not in seen:
                seen.add(id(buffer))
                total += buffer.numel() * buffer.element_size()
    return {"bytes": total, "largest_linear_bytes": largest}


# -- attention as the device computes it ---------------------------------------------------------------------------


def _device_attention(device: str) -> Any:
    """scaled_dot_product_attention for meta tensors that takes the kernel `device` would, so that its saved
    tensors are that kernel's (a flash kernel keeps no sequence x sequence scores)."""
    real = torch.nn.functional.scaled_dot_product_attention

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        if query.device.type != "meta" or dropout_p or _backend(device, query, key, attn_mask, is_causal, enable_gqa) != FLASH:
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        if key.shape[1] != query.shape[1]:  # grouped-query attention: the kernel reads each kv head for its group
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        mask = attn_mask if attn_mask is None or attn_mask.dtype != torch.bool else None
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal and mask is None, attn_mask=mask, scale=scale
        )
        return out

    return attention


def _backend(device: str, query: torch.Tensor, key: torch.Tensor, attn_mask: Any, is_causal: bool, enable_gqa: bool) -> int:
    """The SDPA kernel `device` takes for inputs like these (asked of torch with two-token stand-ins on the CPU)."""
    if device.startswith("cuda"):
        return FLASH
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    q = torch.zeros(1, heads, 2, dim, dtype=query.dtype)
    k = torch.zeros(1, kv_heads, 2, dim, dtype=key.dtype)
    mask = None if attn_mask is None else torch.zeros(1, 1, 2, 2, dtype=attn_mask.dtype)
    try:
        return int(torch._fused_sdp_choice(q, k, k, mask, 0.0, is_causal, scale=None, enable_gqa=enable_gqa))
    except Exception:  # an argument this torch does not take: the math kernel, the larger estimate
        return 0


# -- what bitsandbytes' matmuls allocate --------------------------------------------------------------------------


class _FourBit(torch.autograd.Function):
    """MatMul4Bit's allocations: the weight dequantized to the compute dtype for the forward and again for the
    backward, nothing of the input kept (the frozen codes are all it saves)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.shape = weight.shape
        return torch.nn.functional.linear(x, torch.empty(weight.shape, dtype=x.dtype, device=x.device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device), None


class _Int8Training(torch.autograd.Function):
    """bitsandbytes' LLM.int8 matmul while training on a CPU (MatMul8bitFp): the int8 weight dequantized to the
    compute dtype in the forward and again in the backward, and the input kept for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.shape = weight.shape
        ctx.x = x  # kept alive as bitsandbytes keeps it (ctx.A)
        scale = torch.empty(weight.shape[0], 1, device=x.device)
        dequantized = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
        del scale
        return torch.nn.functional.linear(x, dequantized)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        dequantized = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ dequantized, None


def _int8_inference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' LLM.int8 matmul without gradients (MatMul8bitLt): the input cast to float16, quantized
    row-wise to int8 with an outlier mask, multiplied into int32, and dequantized through float32."""
    rows, out = x.numel() // x.shape[-1], weight.shape[0]
    half = x.to(torch.float16) if x.dtype != torch.float16 else x
    outliers = half.abs() >= 0
    codes = torch.empty(half.shape, dtype=torch.int8, device=x.device)
    del outliers
    product = torch.empty(rows, out, dtype=torch.int32, device=x.device)
    del half, codes
    scaled = product * torch.empty(rows, 1, device=x.device)
    del product
    return (scaled * 1.0).to(x.dtype).reshape(*x.shape[:-1], out)


def stand_in_quantized(model: nn.Module, precision: Precision) -> None:
    """Give each linear bitsandbytes would quantize the allocations of its matmul (the meta model is dense)."""
    if not precision.quantized:
        return
    skip = kept_dense(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _converted(name, skip):
            module.forward = _quantized_forward(module, precision)


def _quantized_forward(module: nn.Linear, precision: Precision) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if precision.kind == "4bit":
            out = _FourBit.apply(x, module.weight)
        elif torch.is_grad_enabled() and module.training:
            out = _Int8Training.apply(x, module.weight)
        else:
            out = _int8_inference(x, module.weight)
        return out if module.bias is None else out + module.bias

    return forward


# -- one step on the meta device ----------------------------------------------------------------------------------


def _train_inputs(task: str, batch: int, length: int, image_size: int) -> dict[str, torch.Tensor]:
    """A training batch as the task's loader makes it, on the meta device."""
    meta = torch.device("meta")
    if task == "clip":
        return {"input_ids": torch.empty(batch, length, dtype=torch.long, device=meta),
                "attention_mask": torch.empty(batch, length, dtype=torch.long, device=meta),
                "pixel_values": torch.empty(batch, 3, image_size, image_size, device=meta)}
    window = torch.empty(batch, length + 1, dtype=torch.long, device=meta)
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}


def train_step_bytes(model: nn.Module, task: Any, batch: int, length: int, image_size: int, max_grad_norm: float | None) -> int:
    """Peak bytes of one training step's batch, forward, loss, backward and gradient clipping, above the model."""
    from qbench.cell.tasks.batch import Batch

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = LiveBytes(list(model.parameters()) + list(model.buffers()), mask_all_ones=task.name != "clip")
    with counter:
        inputs = _train_inputs(task.name, batch, length, image_size)
        loss = task.loss(model, Batch(inputs, batch, batch * length))
        loss.backward()
        del loss, inputs
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    for parameter in trainable:
        parameter.grad = None
    return counter.peak


@torch.no_grad()
def eval_batch_bytes(model: nn.Module, task_name: str, batch: int, length: int, image_size: int) -> int:
    """Peak bytes of one evaluation batch above the model (clip: the larger of an image and a text batch)."""
    model.eval()
    meta = torch.device("meta")
    counter = LiveBytes(list(model.parameters()) + list(model.buffers()), mask_all_ones=task_name != "clip")
    with counter:
        if task_name == "clip":
            model.get_image_features(pixel_values=torch.empty(batch, 3, image_size, image_size, device=meta))
            model.get_text_features(input_ids=torch.empty(batch, length, dtype=torch.long, device=meta),
                                    attention_mask=torch.empty(batch, length, dtype=torch.long, device=meta))
        else:
            from qbench.cell.tasks.causal_lm import score_batch

            ids = torch.empty(batch, length, dtype=torch.long, device=meta)
            score_batch(model, ids, torch.empty(batch, length, dtype=torch.long, device=meta), ids)
    return counter.peak


# -- the request ------------------------------------------------------------------------------------------------------


def meta_model(loaded: Any, model_path: str, compute_dtype: str) -> nn.Module:
    """The suite's model built from its config on the meta device, in the compute dtype, before LoRA."""
    from transformers import AutoConfig

    from qbench.cell.tasks import auto_class

    spec = loaded.suite.model
    config = AutoConfig.from_pretrained(model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = auto_class(loaded.suite.task).from_config(config, dtype=getattr(torch, compute_dtype),
                                                          trust_remote_code=spec.trust_remote_code)
    model.requires_grad_(False)
    return model


def image_size(model: nn.Module) -> int:
    vision = getattr(model.config, "vision_config", None)
    return int(getattr(vision, "image_size", 0) or 0)


def checkpoint_bytes(model_path: str, spec: Any) -> int | None:
    """Bytes of the tensors in the checkpoint's weight files (safetensors: each file less its header)."""
    from qbench.cell import models

    folder = models.checkpoint_folder(model_path, spec.revision)
    if folder is None:
        return None
    total = 0
    for name in models.weight_files(folder, spec.safetensors_only):
        path = folder / name
        if not name.endswith(".safetensors") or not path.is_file():
            return None
        with open(path, "rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
        total += path.stat().st_size - 8 - header
    return total


def trainable(model: nn.Module) -> tuple[int, int, list[int]]:
    """(parameters, bytes, elements of each tensor) of what LoRA trains."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in tensors), sum(p.numel() * p.element_size() for p in tensors), [p.numel() for p in tensors]


def estimate(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (see `main`)."""
    from qbench.cell import lora, models
    from qbench.cell.tasks import task_class
    from qbench.contract import grid, lengths
    from qbench.contract.protocol import CellSpec

    spec = CellSpec(suite_text=request["suite_text"], suite_path=request["suite_path"], suite_sha256="", run_id="estimate",
                    cell_id="estimate", precision=request["precisions"][0], seed=0, device="meta", record_path="")
    loaded = spec.loaded_suite()
    suite = loaded.suite
    compute_dtype, device = request["compute_dtype"], request["device"]
    model_path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
    base = meta_model(loaded, model_path, compute_dtype)
    answer: dict[str, Any] = {
        "checkpoint_bytes": checkpoint_bytes(model_path, suite.model),
        "base": {name: base_bytes(base, precisions.get(name), compute_dtype) for name in request["precisions"]},
        "points": [],
    }
    size = image_size(base)
    limit = lengths.model_limit(suite.task, base.config)
    answer["max_positions"] = limit.tokens
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _device_attention(device)
    kinds = {name: precisions.get(name) for name in request["precisions"]}
    # the activations differ only by the kind of matmul: one meta run per kind present
    representative = {p.kind: p for p in reversed(list(kinds.values()))}
    try:
        built: dict[tuple[Any, ...], tuple[nn.Module, Any]] = {}
        for point in request["points"]:
            cell = grid.cell_from_values(suite, {**point["axes"], "precision": request["precisions"][0], "seed": 0})
            for_cell = loaded.for_cell(cell)
            train = for_cell.suite.train
            length = lengths.train_max_length(for_cell.suite, limit)[0]
            window = length if suite.task == "clip" else (suite.eval.window or limit.tokens or length)
            found: dict[str, Any] = {"axes": point["axes"], "train_bytes": {}, "eval_bytes": {}}
            for kind, precision in representative.items():
                key = (for_cell.suite.lora.r, train.gradient_checkpointing, kind)
                if key not in built:
                    model = meta_model(loaded, model_path, compute_dtype)
                    stand_in_quantized(model, precision)
                    model = lora.attach(lora.prepare(model, for_cell.suite), for_cell.suite, task_class(suite.task).peft_task_type, 0)
                    built[key] = (model, task_class(suite.task)(for_cell, model_path, "meta"))
                model, task = built[key]
                step = train_step_bytes(model, task, train.batch_size, length, size, train.max_grad_norm)
                batch = eval_batch_bytes(model, suite.task, suite.eval.batch_size, window, size)
                for name, other in kinds.items():
                    if other.kind == kind:
                        found["train_bytes"][name], found["eval_bytes"][name] = step, batch
            found["lora_params"], found["lora_bytes"], found["lora_elements"] = trainable(model)
            answer["points"].append(found)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return answer


def main() -> int:
    """Read the request, write the answer: {"checkpoint_bytes", "base": {precision: {...}}, "points": [...]}, or
    {"error": "..."} (exit 1)."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        answer = estimate(json.loads(sys.stdin.read()))
    except Exception as error:  # the parent turns it into one line
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
