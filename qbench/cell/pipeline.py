"""One cell in its own process: load, quantize, attach LoRA, evaluate, train, evaluate, measure.

Run as `python -m qbench.cell` with the cell's spec as JSON on standard input. Progress goes to
standard output as `QBENCH_EVENT {...}` lines; the record is written atomically whatever happens.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qbench.cell import faults as fault_injection
from qbench.results import records as results
from qbench.suite import precisions
from qbench.suite.spec import LoadedSuite, parse

EVENT_PREFIX = "QBENCH_EVENT "


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the cell; the record is written as interrupted."""


def emit(event: str, **fields: Any) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _raise_interrupted(signum: int, frame: Any) -> None:
    # one stop is enough: a second signal (Ctrl-C reaches the cell, then the runner's SIGTERM) must not
    # break off the writing of the record
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def _status_for(error: BaseException) -> str:
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(error, NotImplementedError):
        return "unsupported"
    return "failed"


def _adapter_bytes(model: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="qbench-adapter-") as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("adapter_model.*"))


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell described by `spec` and return its record (also written to spec['record_path'])."""
    suite = parse(spec["suite_text"], spec["suite_path"])
    loaded = LoadedSuite(suite, Path(spec["suite_path"]), spec["suite_sha256"], spec["suite_text"])
    precision = precisions.get(spec["precision"])
    seed, device = int(spec["seed"]), spec["device"]
    record: dict[str, Any] = {
        "schema_version": results.SCHEMA_VERSION,
        "suite": suite.name,
        "suite_sha256": spec["suite_sha256"],
        "run_id": spec["run_id"],
        "cell_id": spec["cell_id"],
        "task": suite.task,
        "model": suite.model.id,
        "precision": precision.name,
        "baseline_precision": suite.baseline,
        "seed": seed,
        "status": "running",
        "error": None,
        "error_type": None,
        "time.start": _now(),
        "config.compute_dtype": suite.compute_dtype,
        "config.prepare": suite.train.prepare,
        "config.gradient_checkpointing": suite.train.gradient_checkpointing,
        "config.safetensors_only": suite.model.safetensors_only,
        "config.trust_remote_code": suite.model.trust_remote_code,
        "config.device_map": suite.model.device_map,
        **{f"config.lora.{k}": (",".join(v) if isinstance(v, tuple) else v) for k, v in suite.lora.model_dump().items()},
        **{f"config.train.{k}": v for k, v in suite.train.model_dump().items()},
        **{f"precision.{k}": v for k, v in precision.settings().items()},
    }
    tracker = None
    timer = None
    record_path = Path(spec["record_path"])

    def measured() -> dict[str, Any]:
        """The record with every figure measured so far."""
        full = dict(record)
        if tracker is not None:
            full.update(tracker.record)  # per phase, and memory.peak_<source>_bytes over the phases
        if timer is not None:
            full.update(timer.summary())
        return full

    def enter(phase: str, **fields: Any) -> None:
        """Start a phase: tell the runner, leave what was measured on disk (status `running`: if the
        process dies, the runner keeps these figures in its failure record), fire any test fault."""
        record["last_phase"] = phase
        emit("phase", phase=phase, **fields)
        results.write_json_atomic(record_path, measured())
        faults.phase(phase)

    def on_step(step: int, loss: float) -> None:
        record["train.steps_completed"] = step
        record["train.last_loss"] = loss
        record.setdefault("train.first_loss", loss)
        emit("step", step=step, total=suite.train.steps, loss=loss)

    try:
        faults = fault_injection.Injector(spec["cell_id"])
        if faults.faults:
            record["test.injected_faults"] = faults.describe()
        import torch

        from qbench.cell import models
        from qbench.cell.train import train
        from qbench.machine import environment
        from qbench.measure import weight_error, weights
        from qbench.measure.memory import MemoryTracker
        from qbench.measure.timing import StepTimer
        from qbench.tasks import get_task

        record.update(environment.describe(device))
        torch.manual_seed(seed)
        model_path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
        record["model_path"] = model_path
        tracker = MemoryTracker(device)
        task = get_task(suite, loaded, model_path, device)

        enter("data")
        with tracker.phase("data"):
            record.update(task.prepare_data())

        enter("load")
        started = time.perf_counter()
        with tracker.phase("load"):
            model = models.load_base(task.model_class, model_path, precision, suite.compute_dtype, device, suite.model)
        record["time.load_s"] = time.perf_counter() - started
        record.update(models.placement(model))
        record["bnb.cpu_weight_packing_disabled_layers"] = models.disable_bnb_cpu_weight_packing(model)
        record.update(weights.read_format(model))
        record.update(weights.account_base(model))
        weights.check_format(model, precision, suite.compute_dtype)  # the arm must be what its name says
        started = time.perf_counter()  # outside every phase: reading the originals is the harness's work
        record.update(weight_error.measure(model, model_path, suite.model.revision))
        record["time.weight_error_s"] = time.perf_counter() - started

        enter("prepare")
        with tracker.phase("prepare"):
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            if suite.train.prepare == "peft-kbit":
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=suite.train.gradient_checkpointing
                )
            elif suite.train.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            lora = suite.lora
            torch.manual_seed(seed)  # the same LoRA initialisation in every arm
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    bias=lora.bias,
                    target_modules=list(lora.target_modules),
                    task_type=task.peft_task_type,
                ),
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record["params.trainable"] = trainable
        record["params.lora_modules"] = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))

        if suite.eval.before:
            enter("eval_before")
            started = time.perf_counter()
            with tracker.phase("eval_before"):
                record.update({f"quality.before.{k}": v for k, v in task.evaluate(model).items()})
            record["time.eval_before_s"] = time.perf_counter() - started

        enter("train", total=suite.train.steps)
        torch.manual_seed(seed)  # the same dropout masks and data order in every arm
        timer = StepTimer(suite.train.untimed_steps, cuda=device.startswith("cuda"))
        started = time.perf_counter()
        with tracker.phase("train"):
            result = train(
                model,
                task.train_batches(seed),
                faults.wrap_loss(task.loss),
                suite.train,
                timer,
                on_step=on_step,
            )
        record["time.train_s"] = time.perf_counter() - started
        record["train.first_loss"] = result.first_loss
        record["train.final_loss"] = result.final_loss

        enter("eval_after")
        started = time.perf_counter()
        with tracker.phase("eval_after"):
            record.update({f"quality.after.{k}": v for k, v in task.evaluate(model).items()})
        record["time.eval_after_s"] = time.perf_counter() - started
        record["weights.adapter_bytes"] = _adapter_bytes(model)
        record["status"] = "ok"
        record["last_phase"] = "done"
    except BaseException as error:  # recorded, never lost: the suite goes on with the next cell
        record["status"] = _status_for(error)
        record["error"] = f"{type(error).__name__}: {error}"
        record["error_type"] = type(error).__name__
        record["error_phase"] = record.get("last_phase")
        record["error_traceback"] = traceback.format_exc(limit=20)
    finally:
        record.update(measured())
        if tracker is not None:
            tracker.close()
        record["time.end"] = _now()
        results.write_json_atomic(record_path, record)
    return record


def main() -> int:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    spec = json.loads(sys.stdin.read())
    record = run_cell(spec)
    emit("done", status=record["status"], error=record["error"])
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
