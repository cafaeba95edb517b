"""Run the kernel microbenchmarks and compare them with this machine's saved reference (`tox -e bench`).

    python benchmarks/bench.py                   # compare with the reference; fail if a median got slower
    python benchmarks/bench.py --save-reference  # (re)record the reference on this machine
    QBENCH_BENCH_FAIL=median:15% python benchmarks/bench.py   # a tighter limit on a quiet machine

Without a reference the first run records one. References live in .benchmarks/ (git-ignored: timings
belong to one machine, so each machine keeps its own).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STORAGE = HERE.parent / ".benchmarks"
REFERENCE = "reference"
DEFAULT_FAIL = "median:30%"  # medians, not means: a shared CPU's load spikes hit the mean hardest


def latest_reference() -> Path | None:
    saved = sorted(STORAGE.glob(f"*/*_{REFERENCE}.json"), key=lambda p: p.name)
    return saved[-1] if saved else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-reference", action="store_true", help="record this run as the machine's reference")
    args, pytest_args = parser.parse_known_args(argv)
    base = [str(HERE), f"--benchmark-storage=file://{STORAGE}", "--benchmark-sort=name", "-p", "no:cacheprovider"]
    reference = None if args.save_reference else latest_reference()
    if reference is None:
        print(f"bench: recording the reference in {STORAGE} (run again to compare with it)", flush=True)
        return pytest.main([*base, f"--benchmark-save={REFERENCE}", *pytest_args])
    fail = os.environ.get("QBENCH_BENCH_FAIL", DEFAULT_FAIL)
    print(f"bench: comparing with {reference.relative_to(STORAGE.parent)}; fail when {fail} slower", flush=True)
    return pytest.main([*base, f"--benchmark-compare={reference}", f"--benchmark-compare-fail={fail}", *pytest_args])


if __name__ == "__main__":
    sys.exit(main())
