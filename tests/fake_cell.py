"""A stand-in for `python -m qbench.cell` that needs no GPU: it speaks the same protocol (spec on
stdin, QBENCH_EVENT lines on stdout, record file written atomically) and records the device it
was given and who else ran at the same time, so tests can check the scheduler with fake devices.

Controlled by the environment: FAKE_CELL_DIR (shared folder of "running" markers),
FAKE_CELL_HOLD_S (seconds to stay running), FAKE_CELL_CRASH (precisions that die without a record).
Like a real cell, SIGTERM (SIGINT, SIGHUP) makes it write an interrupted record naming the signal and stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path

EVENT_PREFIX = "QBENCH_EVENT "  # qbench.contract.protocol's; the standard library only, so a fake cell starts in a blink


def write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


def emit(**event) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def running_now(folder: Path) -> dict[str, str]:
    seen = {}
    for marker in folder.iterdir():
        try:
            seen[marker.name] = marker.read_text()
        except FileNotFoundError:  # finished between listing and reading
            pass
    return seen


def identity(spec: dict, suite: dict) -> dict:
    return {
        "schema_version": 3,  # qbench.contract.schema.SCHEMA_VERSION (a fake cell imports nothing of qbench)
        "suite": suite["name"],
        "task": suite["task"],
        "run_id": spec["run_id"],
        "cell_id": spec["cell_id"],
        "precision": spec["precision"],
        "baseline_precision": suite.get("baseline", "bf16"),
        "seed": spec["seed"],
    }


def main() -> int:
    spec = json.loads(sys.stdin.read())
    suite = tomllib.loads(spec["suite_text"])
    cell_id, device = spec["cell_id"], os.environ.get("CUDA_VISIBLE_DEVICES")
    folder = Path(os.environ["FAKE_CELL_DIR"]) / "running"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / cell_id

    def stop(signum, frame):
        marker.unlink(missing_ok=True)
        write_json_atomic(Path(spec["record_path"]), {**identity(spec, suite), "status": "interrupted", "error_type": "Interrupted",
                                                      "error": f"Interrupted: stopped by signal {signal.Signals(signum).name}"})
        sys.exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # as a real cell stops
        signal.signal(sig, stop)
    marker.write_text(device or "")
    pids = Path(os.environ["FAKE_CELL_DIR"]) / "pids"  # who runs each cell, for tests that kill its parent
    pids.mkdir(parents=True, exist_ok=True)
    (pids / cell_id).write_text(str(os.getpid()))
    emit(event="phase", phase="load", cell=cell_id)
    peak, clashes = 0, set()
    deadline = time.monotonic() + float(os.environ.get("FAKE_CELL_HOLD_S", "0"))
    while True:
        others = running_now(folder)
        peak = max(peak, len(others))
        clashes |= {name for name, other in others.items() if name != cell_id and other == (device or "")}
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    emit(event="phase", phase="train", total=2, cell=cell_id)
    emit(event="step", step=1, total=2, loss=1.0, cell=cell_id)
    marker.unlink()
    if spec["precision"] in os.environ.get("FAKE_CELL_CRASH", "").split(","):
        return 3  # dies without writing its record
    record = {
        **spec.get("run_fields", {}),  # what the runner knows (the data's fingerprint, ...), as a real cell records it
        **identity(spec, suite),
        "status": "ok",
        "error": None,
        "env.device": spec["device"],
        "env.executor": spec.get("executor", "local"),
        "env.cuda_visible_devices": device,
        "test.cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "test.peak_running": peak,
        "test.device_clashes": ",".join(sorted(clashes)) or None,
        "test.pid": os.getpid(),
        "test.axes": spec.get("axes"),  # the grid axis values the runner sent (qbench.contract.protocol.CellSpec.axes)
    }
    write_json_atomic(Path(spec["record_path"]), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
