"""One cell in its own process: load, quantize, attach LoRA, evaluate, train, evaluate, merge (if asked), measure.

Run as `python -m qbench.cell` with the cell's spec (`qbench.contract.protocol.CellSpec`) as JSON on
standard input. Progress goes to standard output as `QBENCH_EVENT {...}` lines; the record is
written atomically whatever happens, and at the start of every phase as a `running` checkpoint, but
only while this process is the cell's current attempt (a newer one owns the record otherwise).

A cell does not outlive its runner: on Linux it asks for SIGTERM when its parent dies
(prctl PR_SET_PDEATHSIG), it stops when its parent is no longer the runner that started it, and a
closed progress pipe stops it too (on every system).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.cell import budget
from qbench.contract import inits, precisions, schema
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec, event_line, identity_fields
from qbench.contract.schema import STARVED_SHARE, time_key

if TYPE_CHECKING:
    from qbench.cell.measure.memory import MemoryTracker
    from qbench.cell.measure.timing import StepTimer
    from qbench.contract.precisions import Precision
    from qbench.contract.suite import Suite
    from qbench.machine.compute import ComputeChoice


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP reached the cell; the record is written as interrupted, naming it."""


class RunnerGone(Interrupted):
    """The runner that started this cell is gone (its pipe closed, or the cell was handed to another parent)."""


EXIT_SUPERSEDED = 3  # the cell stopped without writing: a newer attempt owns its record
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_pipe_closed = False


def emit(event: str, **fields: Any) -> None:
    """One progress line to the runner; RunnerGone when nobody reads them any more."""
    global _pipe_closed
    if _pipe_closed:
        return
    try:
        print(event_line(event, **fields), flush=True)
    except (BrokenPipeError, ValueError):  # ValueError: stdout already closed
        _pipe_closed = True
        _silence_stdout()
        raise RunnerGone("the runner's progress pipe closed: the runner is gone") from None


class _Once:
    """A logging filter that lets each distinct message through once (bitsandbytes logs the same cast note at
    every int8 matmul)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: Any) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_libraries() -> None:
    """Keep the cell's log (its stderr) a log: no progress bars (tqdm's carriage returns), no deprecation notices
    of the libraries qbench calls (they say nothing of the measurement), each library message once."""
    import logging
    import warnings

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = os.environ["TQDM_DISABLE"] = "1"  # for what is imported later
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # already imported by a fork server
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!qbench)")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(_Once())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that nothing (the interpreter's exit flush included) writes to a dead pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies, then check that the parent is still
    the runner (it may have died before the request); RunnerGone if not."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the pipe and the attempt token still hold
    check_parent(parent_pid)


def check_parent(parent_pid: int) -> None:
    """RunnerGone when this process's parent is no longer the runner `parent_pid` (0: no runner to check)."""
    if parent_pid and os.getppid() != parent_pid:
        raise RunnerGone(f"the runner (pid {parent_pid}) is gone")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_parent_pid = 0  # the process that started this cell (the runner, or the run's fork server); 0: not known


def _raise_interrupted(signum: int, frame: Any) -> None:
    # one stop is enough: a second signal (Ctrl-C reaches the cell, then the runner's SIGTERM) must not
    # break off the writing of the record
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    reason = f"stopped by signal {signal.Signals(signum).name}"
    from qbench.cell import parent

    runner_gone = signum == signal.SIGTERM and (parent.runner_gone() or _runner_gone())
    if signum == signal.SIGTERM and (runner_gone or _parent_ended()):
        # the parent-death signal (or the fork server's SIGTERM when the runner died): say whose death, not only
        # which signal it is
        gone = "the runner is gone" if runner_gone else f"its parent process (pid {_parent_pid}) ended"
        reason += f", the parent-death signal: {gone}"
    raise Interrupted(reason)


def _parent_ended() -> bool:
    """Whether the process that started this cell has ended: this process was handed to another parent, or its
    parent is a zombie (some kernels, gVisor's among them, send the parent-death signal while the dead parent
    still holds its children, so that getppid() still names it)."""
    if not _parent_pid:
        return False
    if os.getppid() != _parent_pid:
        return True
    try:
        state = Path(f"/proc/{_parent_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc to ask (not Linux): only a change of parent tells
    return state in ("Z", "X")


def _runner_gone() -> bool:
    """Whether nobody reads this cell's progress any more (the runner's end of its stdout pipe is closed)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


class DataChanged(ValueError):
    """A data file differs from what the run's checks read: the cell would train or evaluate on other data."""


def same_data(expected: dict[str, str], read: dict[str, str], loaded: Any) -> None:
    """DataChanged naming the file when a data file the cell read is not what the run's checks read (and
    fingerprinted): one run folder is about one data set."""
    data = loaded.suite.data
    for key, digest in read.items():
        if key in expected and expected[key] != digest:
            name = getattr(data, key.removeprefix("data."), None) if data.kind != "builtin" else f"builtin:{data.name}"
            raise DataChanged(f"{key}: {name} changed since the run's checks read it (sha256 {expected[key][:12]}... then, "
                              f"{digest[:12]}... now): this cell would not measure the data the run's other cells did")


def _status_for(error: BaseException) -> str:
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(error, NotImplementedError):
        return "unsupported"
    return "failed"


def config_fields(suite: Suite, precision: Precision, compute_dtype: str | None = None) -> dict[str, Any]:
    """`config.*` and `precision.*`: every setting the cell ran with, flat. `compute_dtype`: what the cell
    computes in (the suite's setting resolved for the device; the setting itself when not yet resolved)."""
    compute_dtype = compute_dtype or suite.compute_dtype
    return {
        "config.compute_dtype": compute_dtype,
        "config.device_map": suite.model.device_map,
        # a setting of how the data reaches the model, not of the data: the order is the seed's whatever it is
        # (qbench.cell.tasks.clip.EpochOrder), but worker processes add their memory to the cell's tree
        "config.data.num_workers": suite.data.num_workers,
        "config.eval.protocol": suite.eval.protocol if suite.task == "causal_lm" else None,
        **{f"config.lora.{k}": (",".join(v) if isinstance(v, tuple) else v) for k, v in suite.lora.model_dump().items()},
        **{f"config.train.{k}": v for k, v in suite.train.model_dump().items()},
        **{f"precision.{k}": v for k, v in precision.settings(compute_dtype, suite.quantization.llm_int8_threshold).items()},
    }


NOT_TRAINED = "train.steps = 0: no optimizer step was run (the suite measures the quantized base alone)"
SPEED_FIELDS = ("speed.timed_steps", "speed.timed_wall_s", "speed.train_samples_per_s", "speed.train_tokens_per_s",
                "speed.step_time_p50_s", "speed.step_time_p90_s", "speed.step_time_mean_s", "speed.timed_cpu_s",
                "speed.train_samples_per_cpu_s", "speed.train_tokens_per_cpu_s", "speed.step_cpu_time_p50_s",
                "speed.step_unqueued_time_p50_s", "speed.step_unqueued_times_s", "speed.timed_queue_wait_s", "speed.contended")


def untrained_fields(record: dict[str, Any]) -> dict[str, Any]:
    """With train.steps = 0: every training, speed and after-training figure absent (None), never zero, with why."""
    after = [key.replace("quality.eval_before.", "quality.eval_after.", 1) for key in record if key.startswith("quality.eval_before.")]
    return {
        "train.steps_completed": 0,
        "train.first_loss": None,
        "train.final_loss": None,
        "train.absent_reason": NOT_TRAINED,
        **dict.fromkeys(SPEED_FIELDS, None),
        "speed.absent_reason": NOT_TRAINED,
        time_key("train"): None,
        time_key("eval_after"): None,
        **dict.fromkeys(after, None),
        "quality.eval_after_absent_reason": NOT_TRAINED,
    }


def process_age_s() -> float | None:
    """Seconds since this process was created, to the kernel's clock tick (10 ms): its start time in
    /proc/self/stat is counted on the boot-time clock (psutil's create_time adds the boot time in whole
    seconds, off by up to one). None where there is no /proc."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class CellRun:
    """One cell's record as it is measured: the phases enter, measure and time themselves through `phase()`."""

    def __init__(self, spec: CellSpec):
        self.spec = spec
        loaded = spec.loaded_suite()
        self.cell = spec.cell(loaded)
        self.loaded = loaded.for_cell(self.cell)  # the suite with the cell's axis values in the settings they override
        self.suite = self.loaded.suite
        self.precision = precisions.get(spec.precision)
        self.seed, self.device = spec.seed, spec.device
        self.record_path = Path(spec.record_path)
        self.attempt = spec.attempt
        self.compute: ComputeChoice | None = None
        self.record: dict[str, Any] = {
            **identity_fields(self.loaded, spec.run_id, self.cell, spec.cell_id),
            "status": "running",
            "error": None,
            "error_type": None,
            "time.start": _now(),
            "env.executor": spec.executor,
            **config_fields(self.suite, self.precision),
            **spec.run_fields,
        }
        if spec.compute:
            from qbench.machine.compute import ComputeChoice

            self.use_compute(ComputeChoice.from_dict(spec.compute))
        self.tracker: MemoryTracker | None = None
        self.timer: StepTimer | None = None
        self.param_names: dict[int, str] = {}  # id(parameter) -> its name, for what the record says of parameters
        self.losses: list[float] = []  # every optimizer step's loss, for the record's loss curve

    def update(self, fields: dict[str, Any]) -> None:
        self.record.update(fields)

    def use_compute(self, choice: ComputeChoice) -> None:
        """Compute in `choice.dtype`; the record says which, and why."""
        self.compute = choice
        self.record.update(config_fields(self.suite, self.precision, choice.dtype))
        self.record.update(choice.record_fields())

    @property
    def compute_dtype(self) -> str:
        return self.compute.dtype if self.compute is not None else self.suite.compute_dtype

    def imported(self) -> None:
        """`time.process_start.wall_s`: from the creation of this process (a fork of the run's fork server, or a
        fresh interpreter) to now, when everything the cell needs is imported."""
        self.record[time_key("process_start")] = process_age_s()
        self.record["env.pid"] = os.getpid()

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the block's wall time to `time.<part>.wall_s`, outside any memory phase (work of the harness, not
        of the fine-tune; a part may be timed in several blocks)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            key = time_key(part)
            self.record[key] = (self.record.get(key) or 0.0) + time.perf_counter() - started

    def measured(self) -> dict[str, Any]:
        """The record with every figure measured so far."""
        full = dict(self.record)
        if self.tracker is not None:
            full.update(self.tracker.record)  # per phase, and memory.all_phases.<source>_peak_bytes over the phases
        if self.timer is not None:
            full.update(self.timer.summary())
        if self.losses:  # a cell stopped in its train phase keeps the curve up to there
            from qbench.cell.train import loss_curve

            curve, every = loss_curve(self.losses)
            full.update({"train.loss_curve": curve, "train.loss_curve_every_steps": every})
        return full

    @contextmanager
    def phase(self, name: str, process_baseline: bool = False, **event_fields: Any) -> Iterator[None]:
        """Enter phase `name`: tell the runner, leave what was measured so far on disk (status `running`:
        if the process dies, the runner keeps these figures in its failure record), then measure the block's
        memory, CPU and wall time (`time.<name>.wall_s`); with `process_baseline`,
        the memory of the process as the phase starts (see MemoryTracker.phase)."""
        self.record["last_phase"] = name
        emit("phase", phase=name, **event_fields)
        self.write(self.measured())
        started = time.perf_counter()
        try:
            with self.tracker.phase(name, process_baseline=process_baseline, in_peak=name not in schema.ON_REQUEST_PHASES):
                yield
        finally:
            self.record[time_key(name)] = time.perf_counter() - started

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Leave `record` on disk as the record model reads it, while this process is the cell's current attempt
        (Superseded otherwise); returns what was written (a record the model refuses is written as failed,
        naming what it refused: qbench.contract.records.checked)."""
        return results.write_record(self.record_path, record, self.attempt)

    def adapter_folder(self) -> Path | None:
        """Where the trained adapter is kept (`output.keep_adapters`): RUN/adapters/<cell>, beside the run's cells/
        folder; None when the suite does not keep adapters, or the record is written outside a run folder (a Ray
        task's scratch copy: the adapter stays there, and `adapter.not_kept_reason` says so)."""
        if not self.suite.output.keep_adapters:
            return None
        if self.record_path.parent.name != results.RECORDS_DIR:
            self.record["adapter.not_kept_reason"] = f"the cell wrote its record outside a run folder ({self.record_path})"
            return None
        return results.adapter_path(self.record_path.parent.parent, self.spec.cell_id)

    def on_step(self, step: int, loss: float) -> None:
        self.record["train.steps_completed"] = step
        self.record["train.final_loss"] = loss  # of the last step run; the final one once training ends
        self.record.setdefault("train.first_loss", loss)
        self.losses.append(loss)
        emit("step", step=step, total=self.suite.train.steps, loss=loss)

    def on_first_step(self, optimizer: Any) -> None:
        """What optimizer was built and its exact state bytes, read once its state exists; and which trainable
        parameters the first step's backward pass left without a gradient (adapters outside the loss's graph
        train nothing, whatever the suite says)."""
        from qbench.cell.measure import optimizer_state
        from qbench.contract import optimizers

        self.record.update(optimizer_state.describe(optimizer, optimizers.get(self.suite.train.optimizer), self.device))
        idle = [self.param_names.get(id(p), "?") for group in optimizer.param_groups for p in group["params"] if p.grad is None]
        self.record["train.params_without_grad"] = len(idle)
        self.record["train.params_without_grad_names"] = ",".join(idle[:20]) or None

    @contextmanager
    def recorded(self) -> Iterator[None]:
        """Whatever happens inside, the record ends on disk with a status; an error is recorded, never lost
        (unless a newer attempt owns the record: then nothing is written and Superseded goes on)."""
        superseded = False
        try:
            yield
        except results.Superseded:
            superseded = True
            raise
        except BaseException as error:  # the suite goes on with the next cell
            self.record["status"] = _status_for(error)
            self.record["error"] = f"{type(error).__name__}: {error}"
            self.record["error_type"] = type(error).__name__
            self.record["error_phase"] = self.record.get("last_phase")
            self.record["error_traceback"] = traceback.format_exc(limit=20)
        finally:
            self.record.update(self.measured())
            if self.tracker is not None:
                self.tracker.close()
            self.record.update(budget.verdict(self.record, self.suite, self.device))
            self.record["time.end"] = _now()
            if not superseded:
                self.record = self.write(self.record)


def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Run one cell and return its record (also written to spec.record_path)."""
    cell = CellRun(spec)
    suite, seed = cell.suite, cell.seed
    init = inits.get(suite.lora.init)
    with cell.recorded(), tempfile.TemporaryDirectory(prefix="qbench-cell-") as scratch:
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)  # before any computation: the pool is made at the first one
        quiet_libraries()
        from qbench.cell import inits as full_precision_inits
        from qbench.cell import lora, merge, models, readback
        from qbench.cell.measure import init_error
        from qbench.cell.measure.memory import MemoryTracker
        from qbench.cell.measure.timing import StepTimer
        from qbench.cell.tasks import get_task
        from qbench.cell.train import train
        from qbench.machine import environment, kernels

        cell.imported()
        if cell.compute is None:  # run alone (not by the runner): decide here, as the runner would
            from qbench.cell import compute_probe

            cell.use_compute(compute_probe.decide(cell.loaded, cell.device, suite.compute_dtype,
                                                  precisions.dense_dtypes([cell.precision.name])))
        cell.update(environment.describe(cell.device))
        cell.update(kernels.describe())
        torch.manual_seed(seed)
        model_path = models.resolve(suite.model.id, cell.loaded.path.parent, suite.model.revision)
        cell.update({"model_path": model_path, **models.checkpoint_origin(model_path)})
        cell.update(budget.before_load(suite, cell.device))
        cell.tracker = MemoryTracker(cell.device, cpu_tensor_bytes=budget.tracks(suite))
        task = get_task(cell.loaded, model_path, cell.device)
        work = Path(scratch)
        cell.update({f"lora_init.{key}": value for key, value in init.settings().items()})

        with cell.phase("data"):
            cell.update(task.prepare_data())
            same_data(spec.data_files, task.data_read, cell.loaded)
        if hasattr(task, "contrastive_fields"):
            cell.update(task.contrastive_fields())
        calibration = partial(calibration_inputs, task, seed)  # what a data-driven init (eva, corda) reads

        # an init that decomposes the full-precision checkpoint (pissa, corda, loftq) rewrites the base first;
        # the arm then loads that rewritten base in its own precision
        base_path, initial_adapter = model_path, None
        if init.route == "full-precision":
            with cell.phase("init"):
                base_path, initial_adapter, fields = full_precision_inits.decompose(
                    task.model_class, model_path, suite, cell.precision, task.peft_task_type, cell.device, seed, work, calibration)
            cell.update(fields)
        with cell.phase("load", process_baseline=True):  # the runtime before the model: what no format changes
            model, load_report = models.load_base_reported(
                task.model_class, str(base_path), cell.precision, cell.compute_dtype, cell.device, suite.model,
                llm_int8_threshold=suite.quantization.llm_int8_threshold)
        cell.update(load_report.record())  # what transformers initialised or dropped, allowed or not
        models.check_load_report(model, load_report, suite.model, str(base_path))
        cell.update(models.loaded_weight_files(model_path, suite.model))  # what the base was loaded from
        with cell.timed("readback"):  # the arm is what its name says
            readback.inspect_base(model, cell.precision, suite, str(base_path), cell.record, cell.compute_dtype)
            cell.update(readback.kernel_paths(model, cell.precision, cell.device))
        with cell.phase("prepare"):
            model = lora.prepare(model, suite)
            if initial_adapter is not None:
                model = lora.attach_initialised(model, initial_adapter)
            else:
                model = lora.attach(model, suite, task.peft_task_type, seed, calibration)
        if init.rewrites_base and initial_adapter is None:  # olora: kept for peft's conversion of the trained adapter
            initial_adapter = work / full_precision_inits.INITIAL_ADAPTER_FOLDER
            lora.save_initial(model, initial_adapter)
        cell.update(lora.counts(model))
        cell.update(lora.checkpointing_fields(model, suite))
        cell.param_names = {id(param): name for name, param in model.named_parameters()}
        with cell.timed("readback"):  # still what its name says? and how far the initialised adapter is from W
            readback.inspect_trained_base(model, cell.precision, suite, cell.record, cell.compute_dtype)
            cell.update(init_error.measure(model, model_path, cell.precision, cell.compute_dtype, suite.model.revision))

        unmerged = None  # the last evaluation of the adapter unmerged: what a merge is judged against
        if suite.eval.before:
            with cell.phase("eval_before"):
                unmerged = task.evaluate(model)
            cell.update(unmerged.record("eval_before"))

        if suite.train.steps == 0:  # the quantized base alone: nothing trained, so nothing after training either
            cell.update(untrained_fields(cell.record))
        else:
            with cell.phase("train", total=suite.train.steps):
                torch.manual_seed(seed)  # the same dropout masks and data order in every arm
                cell.timer = StepTimer(suite.train.untimed_steps, cuda=cell.device.startswith("cuda"))
                result = train(model, task.train_batches(seed), task.loss, suite.train, cell.timer,
                               on_step=cell.on_step, on_first_step=cell.on_first_step,
                               accumulate=getattr(task, "accumulate", lambda: None)())
            cell.update({"train.first_loss": result.first_loss, "train.final_loss": result.final_loss})
            cell.update(contention_fields(cell.measured()))

            with cell.phase("eval_after"):
                unmerged = task.evaluate(model)
            cell.update(unmerged.record("eval_after"))
        cell.update(readback.kernel_paths(model, cell.precision, cell.device))  # as it ran: evaluation may repack
        with cell.timed("adapter_save"):
            kept = cell.adapter_folder()
            cell.update(lora.save_adapter(model, kept or work / "adapter", suite, initial_adapter))
            cell.update({"adapter.kept_path": str(kept) if kept else None})

        # the adapter merged into the base, as users ship it; the requantizing merge rewrites the base in place: last
        if "dequantized" in suite.eval.after_merge:
            with cell.phase("merge_dequantized"), merge.dequantized_copy(model, cell.compute_dtype) as how:
                merged = task.evaluate(model)
            cell.update({**how, **merged.record("merge_dequantized"), **merge.judged(task, merged, unmerged, "dequantized")})
        if "requantized" in suite.eval.after_merge:
            with cell.phase("merge_requantized"):
                model, how = merge.requantize(model)
                merged = task.evaluate(model)
            cell.update({**how, **merged.record("merge_requantized"), **merge.judged(task, merged, unmerged, "requantized")})
        if not suite.eval.after_merge:
            cell.update({"merge.absent_reason": NOT_MERGED})
        cell.update({"status": "ok", "last_phase": "done"})
    return cell.record


NOT_MERGED = ("not asked (eval.after_merge): every quality.* figure is the adapter's attached to the base unmerged; "
              "no merged model was evaluated")


def calibration_inputs(task: Any, seed: int) -> list[dict[str, Any]]:
    """The model inputs a data-driven init reads: the first `inits.CALIBRATION_BATCHES` training batches of the seed."""
    batches = task.train_batches(seed)
    return [next(batches).inputs for _ in range(inits.CALIBRATION_BATCHES)]


# a cell whose threads waited for a core this share of the time they were ready to run, or ran on a virtual
# machine whose host took this share of the CPU time away, measured the machine more than itself
CONTENDED_WAIT_SHARE = 0.10
CONTENDED_STEAL_SHARE = 0.10


def contention_fields(record: dict[str, Any]) -> dict[str, Any]:
    """`speed.contended` (True / False / None: not measurable) and `speed.contention`, a sentence saying why,
    from the train phase's CPU figures (`cpu.train.*`, see qbench.cell.measure.memory.cpu_fields)."""
    share, steal = record.get("cpu.train.share"), record.get("cpu.train.steal_share")
    others, cores = record.get("cpu.train.others_busy_cores"), record.get("env.cpu_cores_available")
    if share is None:
        return {"speed.contended": None, "speed.contention": "unavailable: no per-thread scheduler figures (/proc/PID/task/*/schedstat)"}
    waited = 1 - share
    contended = waited >= CONTENDED_WAIT_SHARE or (steal or 0) >= CONTENDED_STEAL_SHARE
    load = f"; other processes kept {others:.1f} of {cores} cores busy" if others is not None and cores else ""
    stolen = f"; the hypervisor took {steal:.0%} of the CPU time" if steal else ""
    verdict = "contended" if contended else "not contended"
    starved = (f"; with a core less than {STARVED_SHARE:.0%} of the time even its CPU time is unreliable (cold caches, "
               "a busy SMT sibling): compare judges no speed ratio of it") if share < STARVED_SHARE else ""
    return {
        "speed.contended": contended,
        "speed.contention": f"{verdict}: while training, the cell's threads waited for a core {waited:.0%} of the time "
                            f"they were ready to run{load}{stolen}{starved}",
    }


def main() -> int:
    global _parent_pid
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupted)
    try:
        spec = CellSpec.from_json(sys.stdin.read())
        _parent_pid = spec.parent_pid
        die_with_parent(spec.parent_pid)
        record = run_cell(spec)
        emit("done", status=record["status"], error=record["error"])
    except RunnerGone as gone:
        print(f"qbench cell: stopped, {gone}", file=sys.stderr)
        return EXIT_SUPERSEDED
    except results.Superseded as superseded:
        print(f"qbench cell: stopped, {superseded}", file=sys.stderr)
        return EXIT_SUPERSEDED
    except OSError as error:  # the record itself could not be written (a full disk): the runner records the cell
        print(f"qbench cell: {error}", file=sys.stderr)
        return 1
    return 0 if record["status"] == "ok" else 1
