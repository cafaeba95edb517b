"""How far the loaded base's linear weights are from the checkpoint's: relative error, layer by layer.

The originals are read from the checkpoint's safetensors one tensor at a time (memory-mapped), so
this works for bases far larger than the free memory. For each linear the error is
‖Ŵ − W‖_F / ‖W‖_F, Ŵ the weight as the loaded base stores it, dequantized to float32, and W the
checkpoint's tensor in float32; the record gives the mean and max over layers and the overall
ratio sqrt(Σ‖Ŵ − W‖²) / sqrt(Σ‖W‖²). A dense bf16 base shows its rounding error the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbench.cell.measure.weights import is_bnb_linear

DEFINITION = "per linear: ||dequantized - original||_F / ||original||_F, original = checkpoint safetensors in float32"


class CheckpointUnavailable(FileNotFoundError):
    """The checkpoint's safetensors files cannot be found locally."""


def safetensors_files(model_path: str, revision: str | None = None) -> list[Path]:
    """The safetensors files of a local checkpoint folder or of a hub id in the local cache."""
    folder = Path(model_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_path, revision=revision, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as error:
            raise CheckpointUnavailable(f"{model_path}: not a folder and not in the local hub cache ({type(error).__name__})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise CheckpointUnavailable(f"{folder}: no *.safetensors files")
    return files


class CheckpointTensors:
    """Reads one named tensor at a time from a set of safetensors files."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def find(self, module_name: str) -> str | None:
        """The checkpoint key of a module's weight; checkpoints may add or drop a leading 'model.'."""
        for candidate in (f"{module_name}.weight", f"model.{module_name}.weight", f"{module_name.removeprefix('model.')}.weight"):
            if candidate in self._where:
                return candidate
        return None

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear computes with, as a float32 tensor of shape (out, in)."""
    name = type(module).__name__
    weight = module.weight
    if name == "Linear4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if name == "Linear8bitLt":
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return weight.detach().float()


def measure(model: nn.Module, model_path: str, revision: str | None = None) -> dict[str, Any]:
    """weights.load.error.* fields: error of the quantized linears (all linears for a dense base) vs the checkpoint."""
    record: dict[str, Any] = {"weights.load.error.definition": DEFINITION}
    try:
        tensors = CheckpointTensors(safetensors_files(model_path, revision))
    except (CheckpointUnavailable, OSError) as error:
        record["weights.load.error.unavailable_reason"] = str(error)
        return record
    # a head tied to the embedding is the embedding's tensor: not a linear of its own, and not in the checkpoint
    owned_elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in owned_elsewhere]
    quantized = [(n, m) for n, m in linears if is_bnb_linear(m)]
    chosen = quantized or linears
    record["weights.load.error.scope"] = "quantized linears" if quantized else "all linears (dense base)"
    errors: list[tuple[float, str]] = []
    squared_error = squared_norm = 0.0
    missing: list[str] = []
    with torch.no_grad():
        for name, module in chosen:
            key = tensors.find(name)
            stored = dequantized_weight(module)
            original = tensors.get(key).to(device=stored.device, dtype=torch.float32) if key else None
            if original is None or original.shape != stored.shape:
                missing.append(name)
                continue
            difference = torch.linalg.vector_norm(stored - original).item()
            norm = torch.linalg.vector_norm(original).item()
            squared_error += difference**2
            squared_norm += norm**2
            errors.append((difference / norm if norm else math.inf if difference else 0.0, name))
            del stored, original
    record["weights.load.error.layers"] = len(errors)
    record["weights.load.error.layers_not_in_checkpoint"] = len(missing)
    if missing:
        record["weights.load.error.first_layer_not_in_checkpoint"] = missing[0]
    if errors:
        worst = max(errors)
        record["weights.load.error.rel_mean"] = sum(e for e, _ in errors) / len(errors)
        record["weights.load.error.rel_max"] = worst[0]
        record["weights.load.error.rel_max_layer"] = worst[1]
        record["weights.load.error.rel_overall"] = math.sqrt(squared_error / squared_norm) if squared_norm else None
    else:
        record["weights.load.error.unavailable_reason"] = "no linear of the model found in the checkpoint under the same name and shape"
    return record
