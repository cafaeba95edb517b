"""Fault injection into real cells, for the tests only (the package knows nothing of it): the faulty cell
(tests/helpers/faulty_cell.py) runs qbench's real pipeline with the faults of QBENCH_TEST_FAULTS planted,
and its record says which (`test.injected_faults`). The variable's value is a comma-separated list of
`CELL:PHASE:KIND[:ARG]`:

    CELL   a cell id (`nf4-seed0`) or `*` for every cell
    PHASE  data, load, prepare, eval_before, train, eval_after
    KIND   oom          raise torch.OutOfMemoryError
           nan          train: make the training loss NaN; eval_before / eval_after: make the model's
                        outputs NaN for the first ARG rows of the first batch through its output
                        projection (CLIP `visual_projection`: image embeddings; causal LM `lm_head`:
                        logits of the first window's first ARG positions)
           unsupported  raise NotImplementedError (the cell's status becomes `unsupported`)
           error        raise RuntimeError
           sigkill      the cell process kills itself with SIGKILL (no chance to write anything)
           sleep        sleep ARG seconds (to interrupt a cell at a known point); with QBENCH_TEST_SLEEPING set
                        to a folder, the cell first leaves PHASE.PID in it, so a test waits for the cell to
                        be asleep instead of guessing how long that takes on a busy machine
           slow         train phase only: every step takes ARG times more CPU (busy work after each loss
                        computation; 0.3 = 30 % more), a real slowdown whatever the machine's load
           alloc        hold ARG MiB of resident memory from the start of the phase to the end of the process
    ARG    for train: the loss computation (1-based) at which the fault fires, default 1;
           for nan in an eval phase: how many rows become NaN, default 1; for sleep: seconds, default 60;
           for slow: the extra CPU per step as a fraction; for alloc: MiB

Example: QBENCH_TEST_FAULTS="nf4-seed0:train:nan:2,int8-seed0:load:sigkill"
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.contract.schema import PHASES

ENV_VAR = "QBENCH_TEST_FAULTS"
SLEEPING_ENV_VAR = "QBENCH_TEST_SLEEPING"
KINDS = ("oom", "nan", "unsupported", "error", "sigkill", "sleep", "slow", "alloc")
EVAL_PHASES = ("eval_before", "eval_after")
OUTPUT_PROJECTIONS = ("visual_projection", "lm_head")  # where an eval-phase nan fault plants its NaN
_HELD: list[bytes] = []  # what alloc faults hold, for the life of the process


@dataclass(frozen=True)
class Fault:
    cell: str
    phase: str
    kind: str
    arg: float | None = None

    @property
    def step(self) -> int:
        return int(self.arg) if self.arg is not None and self.kind not in ("sleep", "slow", "alloc") else 1


def parse(text: str) -> list[Fault]:
    """The faults a QBENCH_TEST_FAULTS value names; ValueError for a malformed one."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        parts = entry.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"{ENV_VAR}: {entry!r} is not CELL:PHASE:KIND[:ARG]")
        cell, phase, kind = parts[:3]
        if phase not in PHASES:
            raise ValueError(f"{ENV_VAR}: unknown phase {phase!r} in {entry!r}; phases: {', '.join(PHASES)}")
        if kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown fault {kind!r} in {entry!r}; faults: {', '.join(KINDS)}")
        if kind == "nan" and phase != "train" and phase not in EVAL_PHASES:
            raise ValueError(f"{ENV_VAR}: a nan fault needs the train or an eval phase, not {phase!r}")
        if kind == "slow" and phase != "train":
            raise ValueError(f"{ENV_VAR}: a slow fault needs the train phase, not {phase!r}")
        faults.append(Fault(cell, phase, kind, float(parts[3]) if len(parts) == 4 else None))
    return faults


def _fire(fault: Fault) -> None:
    message = f"injected by {ENV_VAR} ({fault.cell}:{fault.phase}:{fault.kind})"
    if fault.kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"out of memory, {message}")
    if fault.kind == "unsupported":
        raise NotImplementedError(f"format not supported on this device, {message}")
    if fault.kind == "error":
        raise RuntimeError(message)
    if fault.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "sleep":
        if os.environ.get(SLEEPING_ENV_VAR):
            Path(os.environ[SLEEPING_ENV_VAR], f"{fault.phase}.{os.getpid()}").touch()
        time.sleep(fault.arg if fault.arg is not None else 60)
    if fault.kind == "alloc":
        _HELD.append(b"\x01" * int((fault.arg or 100) * 1024 * 1024))  # written, so every page is resident


class _Slowdown:
    """Busy work after each loss computation: `fraction` of the CPU time the step took since the last one."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self._last: float | None = None
        self._spun = 0.0

    def __call__(self) -> None:
        now = time.process_time()
        if self._last is not None:
            work = max(0.0, now - self._last - self._spun)
            until = now + self.fraction * work
            while time.process_time() < until:
                pass
        self._spun = time.process_time() - now
        self._last = now


class Injector:
    """The faults meant for one cell; `phase()` and `wrap_loss()` fire them at their point."""

    def __init__(self, cell_id: str, environ: Mapping[str, str] | None = None):
        text = (os.environ if environ is None else environ).get(ENV_VAR, "")
        self.faults = [f for f in parse(text) if f.cell in ("*", cell_id)]

    def describe(self) -> str | None:
        return ",".join(f"{f.cell}:{f.phase}:{f.kind}" + (f":{f.arg:g}" if f.arg is not None else "") for f in self.faults) or None

    def phase(self, name: str) -> None:
        """Fire the faults set for the start of phase `name` (train faults fire at their step, eval-phase
        nan faults inside the evaluation instead)."""
        for fault in self.faults:
            if fault.phase != name or (fault.kind == "nan" and name in EVAL_PHASES):
                continue
            if name != "train" or fault.kind == "alloc":
                _fire(fault)

    def wrap_evaluate(self, evaluate: Callable[[Any], Any], phase: str) -> Callable[[Any], Any]:
        """The task's evaluation, with the phase's nan faults planting NaN in the model's outputs."""
        planted = [f for f in self.faults if f.phase == phase and f.kind == "nan"]
        if not planted:
            return evaluate
        rows = int(planted[0].arg) if planted[0].arg is not None else 1

        def evaluate_with_nan(model: Any) -> Any:
            fired = False

            def plant(module: Any, inputs: Any, output: Any) -> Any:
                nonlocal fired
                if fired:
                    return output
                fired = True
                output = output.clone()
                if output.dim() == 3:  # [windows, positions, vocabulary]: the first window's first positions
                    output[0, :rows] = math.nan
                else:  # [images, dimensions]
                    output[:rows] = math.nan
                return output

            handles = [m.register_forward_hook(plant) for name, m in model.named_modules()
                       if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS]
            try:
                return evaluate(model)
            finally:
                for handle in handles:
                    handle.remove()

        return evaluate_with_nan

    def wrap_loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """The task's loss function, with the train-phase faults firing at their loss computation."""
        train_faults = [f for f in self.faults if f.phase == "train" and f.kind not in ("slow", "alloc")]
        slowdowns = [_Slowdown(f.arg if f.arg is not None else 0.3) for f in self.faults if f.phase == "train" and f.kind == "slow"]
        if not train_faults and not slowdowns:
            return loss_fn
        calls = 0

        def loss_with_faults(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            loss = loss_fn(*args, **kwargs)
            for slowdown in slowdowns:
                slowdown()
            for fault in train_faults:
                if fault.step == calls:
                    if fault.kind == "nan":
                        loss = loss * math.nan
                    else:
                        _fire(fault)
            return loss

        return loss_with_faults
