"""A stand-in for the compute probe (qbench.cell.compute_probe) beside the fake cell (tests/fake_cell.py): the
same request on stdin and answer on stdout, without torch and without measuring. The real probe imports torch
(about 2 s of CPU) for every run of fake cells that must decide its compute dtype; what it measures and how is
tests/test_compute_dtype.py's subject. Like the fake cell it takes whatever device it is given (fake GPUs), and
auto means the CPU."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from qbench.machine import compute


def main() -> int:
    request = json.loads(sys.stdin.read() or "{}")
    requested = str(request.get("device", "auto"))
    device = "cpu" if requested == "auto" else requested
    choice = compute.choose(str(request.get("setting", "auto")), device, dense_dtypes=tuple(request.get("dense_dtypes", ())),
                            unmeasured="the test stand-in probe measures nothing")
    print(json.dumps({"device": device, "cuda_available": False, "cuda_bf16": None, "choice": asdict(choice)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
