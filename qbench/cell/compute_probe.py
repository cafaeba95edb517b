"""The compute probe (a child process: forked from the run's fork server, or `python -m qbench.cell.compute_probe`):
which device the run computes on, and what its compute dtype is, measured for `compute_dtype = "auto"`.

The measurement is a training step of the suite's own model (its own weights when the checkpoint is small,
else its architecture from its config with at most MEASURED_LAYERS layers per stack and random weights; the
same weights, rounded, in every dtype), LoRA attached as the suite says,
forward, the task's loss and backward on one real batch of the suite's data, the suite's threads. Each
candidate dtype is first checked (finite loss within LOSS_TOLERANCE of float32's on the same weights, finite
gradients), then timed: warm-up steps untimed, rounds of one step per dtype in turn, the fastest step kept,
for about BUDGET_S (in CPU seconds on a CPU, so that other work on the machine does not decide). A dtype already DROP_FACTOR slower than the fastest after its first round is not timed
further. The answer is kept in the user cache (qbench.machine.compute.cache_file) under what it depends on,
so a machine measures once per torch version, model and step shape.

    request (stdin)  {"device": auto|cpu|cuda[:N], "setting": ..., "dense_dtypes": [...], "suite_text": ...,
                      "suite_path": ..., "threads": N}
    answer (stdout)  {"device": ..., "cuda_available": ..., "cuda_bf16": ..., "choice": ComputeChoice as a dict}
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.machine import compute

if TYPE_CHECKING:

    from qbench.contract.suite import LoadedSuite

MEASUREMENT_VERSION = 1  # bump when what is measured changes: kept measurements of older versions are not used
MEASURED_LAYERS = 4
REAL_WEIGHTS_LIMIT_BYTES = 256 << 20
BUDGET_S = 0.8  # of timed steps, in the clock they are timed with
MIN_ROUNDS, MAX_ROUNDS = 4, 10
DROP_FACTOR, WARM_UP_DROP_FACTOR = 3.0, 5.0
LOSS_TOLERANCE = 0.05  # relative, against float32's loss on the same weights and batch


def candidates(device: str, cuda_bf16: bool | None) -> tuple[str, ...]:
    """The dtypes auto may choose on `device`, most exact first."""
    if device.startswith("cuda") and not cuda_bf16:
        return ("float32", "float16")
    return compute.PREFERENCE


def capped_config(config: Any, layers: int) -> tuple[Any, str]:
    """A copy of `config` with at most `layers` hidden layers in each stack (the model's own, and each sub-model's
    such as CLIP's text and vision towers); with a description ("2+3 of 2+3 layers")."""
    config = copy.deepcopy(config)
    kept, had = [], []
    stacks = [config] + [getattr(config, name) for name in (getattr(config, "sub_configs", None) or {})
                         if getattr(config, name, None) is not None]
    for stack in stacks:
        count = getattr(stack, "num_hidden_layers", None)
        if isinstance(count, int):
            had.append(count)
            stack.num_hidden_layers = min(count, layers)
            kept.append(stack.num_hidden_layers)
    return config, f"{'+'.join(map(str, kept)) or '?'} of {'+'.join(map(str, had)) or '?'} layers"


def small_checkpoint(model_path: str, spec: Any) -> bool:
    """Whether the checkpoint's weights are on disk here and small enough (REAL_WEIGHTS_LIMIT_BYTES) to load whole."""
    from qbench.cell import models

    folder = models.checkpoint_folder(model_path, spec.revision)
    if folder is None:
        return False
    try:
        names = models.weight_files(folder, spec.safetensors_only)
        size = sum((folder / name).stat().st_size for name in names)
    except (OSError, ValueError):
        return False
    return bool(names) and size <= REAL_WEIGHTS_LIMIT_BYTES


def reference_model(task: Any, config: Any, loaded: LoadedSuite, device: str) -> tuple[Any, str]:
    """The suite's model in float32, with a description: its own weights, loaded as a cell loads them, when the
    checkpoint is small; else its architecture with at most MEASURED_LAYERS layers per stack and random weights."""
    import torch

    from qbench.cell import models
    from qbench.contract import precisions

    spec = loaded.suite.model
    if small_checkpoint(task.model_path, spec):
        model = models.load_base(task.model_class, task.model_path, precisions.get("fp32"), "float32", device, spec)
        return model, "its own weights"
    capped, layers = capped_config(config, MEASURED_LAYERS)
    torch.manual_seed(0)
    return task.model_class._from_config(capped, dtype=torch.float32).to(device), f"{layers}, random weights"


def stand_ins(task: Any, config: Any, loaded: LoadedSuite, dtypes: tuple[str, ...], device: str) -> tuple[dict[str, Any], str]:
    """The suite's model (reference_model) in each dtype, the same weights rounded, with LoRA attached as a cell
    attaches it, in training mode; with what the model was."""
    import torch

    from qbench.cell import lora

    reference, described = reference_model(task, config, loaded, device)
    models = {}
    for dtype in dtypes:
        model = copy.deepcopy(reference).to(dtype=getattr(torch, dtype))
        model.requires_grad_(False)
        model = lora.attach(lora.prepare(model, loaded.suite), loaded.suite, task.peft_task_type, seed=0)
        model.train()
        models[dtype] = model
    return models, described


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def checked_loss(task: Any, model: Any, batch: Any) -> float:
    """The batch's loss in evaluation mode (no dropout), without gradients."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            return float(task.loss(model, batch).float())
    finally:
        model.train()


def timed_step(task: Any, model: Any, batch: Any, device: str) -> tuple[float, bool]:
    """(seconds of one forward + loss + backward, whether every LoRA gradient came out finite): on a GPU its wall
    time; on a CPU the CPU time of this process's threads, which other work on the machine does not stretch (a
    waiting OpenMP thread sleeps: see qbench.machine.threads), where wall time under load measures the load."""
    import torch

    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    _synchronize(device)
    started = clock()
    task.loss(model, batch).backward()
    _synchronize(device)
    seconds = clock() - started
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    model.zero_grad(set_to_none=True)
    return seconds, finite


def measure(task: Any, config: Any, loaded: LoadedSuite, device: str, dtypes: tuple[str, ...]) -> compute.DtypeTimings:
    """Time a training step of the suite's model (`config`: its transformers config) in each of `dtypes` (see
    the module docstring)."""
    import torch

    started = time.perf_counter()
    models, layers = stand_ins(task, config, loaded, dtypes, device)
    batch = next(iter(task.train_batches(0)))
    rejected: dict[str, str] = {}
    reference = None
    for dtype in dtypes:
        try:
            loss = checked_loss(task, models[dtype], batch)
        except Exception as error:  # a dtype the device cannot run at all
            rejected[dtype] = f"failed ({type(error).__name__}: {str(error)[:80]})"
            continue
        if dtype == "float32":
            reference = loss
        if not math.isfinite(loss):
            rejected[dtype] = f"computed a non-finite loss ({loss})"
        elif reference is not None and dtype != "float32" and abs(loss - reference) > LOSS_TOLERANCE * max(1.0, abs(reference)):
            rejected[dtype] = f"computed the loss {loss:.4g} against float32's {reference:.4g}"
    timed = [d for d in dtypes if d not in rejected]
    warm_up = {dtype: timed_step(task, models[dtype], batch, device)[0] for dtype in timed}  # kernels chosen, memory allocated
    for dtype in list(timed):  # a dtype several times slower already shows it in its first step
        if warm_up[dtype] > WARM_UP_DROP_FACTOR * min(warm_up.values()):
            rejected[dtype] = f"over {WARM_UP_DROP_FACTOR:g}x slower in its first step ({warm_up[dtype] * 1000:.3g} ms)"
            timed.remove(dtype)
    fastest: dict[str, float] = {}
    rounds, spent = 0, 0.0
    while timed and rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or spent < BUDGET_S):
        rounds += 1
        for dtype in timed[rounds % len(timed):] + timed[:rounds % len(timed)]:  # each dtype first in turn
            seconds, finite = timed_step(task, models[dtype], batch, device)
            spent += seconds
            if not finite:
                rejected[dtype] = "computed non-finite gradients"
                fastest.pop(dtype, None)
                continue
            fastest[dtype] = min(seconds, fastest.get(dtype, math.inf))
        timed = [d for d in timed if d not in rejected]
        best = min(fastest.values(), default=math.inf)
        for dtype in list(timed):
            if fastest[dtype] > DROP_FACTOR * best:
                rejected[dtype] = f"over {DROP_FACTOR:g}x slower after {rounds} step(s) ({fastest.pop(dtype) * 1000:.3g} ms)"
                timed.remove(dtype)
    suite = loaded.suite
    workload = (f"forward, loss and backward of {task.model_class.__name__} ({layers}) with LoRA r={suite.lora.r}, "
                f"batch {suite.train.batch_size} of the suite's data, {torch.get_num_threads()} thread(s) on {device}; "
                f"fastest of {rounds} step(s) after a warm-up, in {'wall' if device.startswith('cuda') else 'CPU'} seconds")
    return compute.DtypeTimings(fastest, rejected, workload, datetime.now(UTC).isoformat(timespec="seconds"),
                                measure_s=round(time.perf_counter() - started, 2))


def cache_key(loaded: LoadedSuite, device: str, device_name: str, dtypes: tuple[str, ...], config_digest: str) -> dict[str, Any]:
    """What a measurement depends on: the machine and device, torch, the threads, the model and the step's shape."""
    import torch

    from qbench.machine.threads import available_cores

    suite = loaded.suite
    return {
        "version": MEASUREMENT_VERSION, "device": device.split(":")[0], "device_name": device_name,
        "cores": available_cores(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": suite.model.id, "revision": suite.model.revision, "config_sha256": config_digest, "task": suite.task,
        "batch_size": suite.train.batch_size, "max_length": suite.train.max_length, "lora_r": suite.lora.r,
        "target_modules": list(suite.lora.target_modules), "prepare": suite.train.prepare,
        "gradient_checkpointing": suite.train.gradient_checkpointing, "candidates": list(dtypes),
    }


def device_name(device: str) -> str:
    import torch

    from qbench.machine.cpuinfo import model as cpu_model

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device).index or 0)
    return cpu_model()


def timings_for(loaded: LoadedSuite, device: str, dtypes: tuple[str, ...]) -> compute.DtypeTimings:
    """The kept measurement for this machine, torch, model and step shape, else a new one (then kept)."""
    from transformers import AutoConfig

    from qbench.cell import models
    from qbench.cell.tasks import get_task

    spec = loaded.suite.model
    model_path = models.resolve(spec.id, loaded.path.parent, spec.revision)
    config = AutoConfig.from_pretrained(model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    digest = hashlib.sha256(config.to_json_string().encode()).hexdigest()
    key = cache_key(loaded, device, device_name(device), dtypes, digest)
    kept = compute.read_cached(key)
    if kept is not None:
        return kept
    task = get_task(loaded, model_path, device)
    task.prepare_data()
    return compute.write_cached(key, measure(task, config, loaded, device, dtypes))


def decide(loaded: LoadedSuite, device: str, setting: str, dense_dtypes: tuple[str, ...] = (),
           cuda_bf16: bool | None = None) -> compute.ComputeChoice:
    """The run's ComputeChoice on `device`: measured (or read from the cache) when auto decides, or when a dtype
    the run computes in is one the device emulates (its warning then says how much slower it measured)."""
    if cuda_bf16 is None and device.startswith("cuda"):
        import torch

        cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    flagged = compute.choose(setting, device, cuda_bf16, dense_dtypes)
    if setting != "auto" and not flagged.emulated:
        return flagged
    try:
        timings = timings_for(loaded, device, candidates(device, cuda_bf16))
    except Exception as error:  # the run goes on with the unmeasured default, and says why
        return compute.choose(setting, device, cuda_bf16, dense_dtypes,
                              unmeasured=f"the measurement failed: {type(error).__name__}: {str(error)[:160]}")
    return compute.choose(setting, device, cuda_bf16, dense_dtypes, timings=timings)


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to a request (see the module docstring)."""
    import torch

    from qbench.contract.suite import LoadedSuite, parse

    requested = str(request.get("device", "auto"))
    cuda_available = torch.cuda.is_available()
    device = ("cuda" if cuda_available else "cpu") if requested == "auto" else requested
    cuda_bf16 = None
    if device.startswith("cuda") and cuda_available:
        cuda_bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    setting, dense = str(request.get("setting", "auto")), tuple(request.get("dense_dtypes", ()))
    if request.get("suite_text") is None:  # nothing to measure with: the flags and torch decide
        choice = compute.choose(setting, device, cuda_bf16, dense, unmeasured="no suite given to measure with")
    else:
        text, path = str(request["suite_text"]), str(request.get("suite_path") or "suite.toml")
        loaded = LoadedSuite(parse(text, path), Path(path), hashlib.sha256(text.encode("utf-8")).hexdigest(), text)
        choice = decide(loaded, device, setting, dense, cuda_bf16)
    from dataclasses import asdict

    return {"device": device, "cuda_available": cuda_available, "cuda_bf16": cuda_bf16, "choice": asdict(choice)}


def main() -> int:
    """`python -m qbench.cell.compute_probe`: a request as JSON on stdin, the answer as JSON on stdout."""
    request = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(probe(request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
