"""What fits: for each arm of a suite, the largest batch_size and/or max_length that trains within a memory budget.

    plan = fit.plan(loaded, budget, axes, ...)     # what to search: SuiteError, one line per problem
    fit.check(plan)                                  # the suite's data, model and lengths at the largest trial
    done = fit.execute(plan, out, listener, threads) # estimate, searches, quality runs -> OUT/<suite>/fit-<time>/

An arm is one cell of the suite's grid without the searched axis (a precision, and a value of each other axis the
matrix lists: optimizer, LoRA rank, ...), at the suite's first seed. For each arm and axis the search runs trials
(`run_trial`: one fresh cell process each, qbench.runner.trial) and judges each by the record's verdict
(`fit.within_budget`: the peak of the cell's tensors above its process baseline, at most (1 - margin) x budget;
qbench.cell.budget). The value it ends on is the largest that fits; one more does not (or it is the range's end).

The search over the range's values low..high takes at most ceil(log2(high - low)) + 3 trials:

1. before any trial, the estimate (qbench.runner.estimate) predicts each value's peak; an arm whose exact parts
   alone (base, adapters, optimizer state) exceed the limit is refused without a trial;
2. the first trial is the largest value the estimate says fits;
3. each later trial is the largest value the estimate, refitted on the arm's trials so far, says fits (or the
   value above the largest known to fit); after trials that measured nothing to refit on (out of memory on a
   capped GPU), exponential steps instead: 1, 2, 4, ... values from the last trial;
4. bisecting: whenever that value could leave more values undecided than the trials left can bisect, the
   midpoint of the undecided values instead; this rule is what bounds the trials.

Gradient accumulation is never changed: the effective batch (batch_size x grad_accum) is reported beside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from qbench.contract import grid, sizes
from qbench.contract.suite import Cell, LoadedSuite, SuiteError, fit_problems
from qbench.runner.estimate import ArmModel, Curve, Prediction, sample_values

COMMAND_LINE = "command line"
DEFAULT_LOW = {"batch_size": 1, "max_length": 8}
BATCH_HIGH = 65_536  # the suite's own limit (qbench.contract.suite.LIMITS)


def bound(low: int, high: int) -> int:
    """The most trials one search takes over low..high: ceil(log2(high - low)) + 3."""
    return math.ceil(math.log2(high - low)) + 3 if high > low else 1


@dataclass(frozen=True)
class Arm:
    """One search's cell: its id (the cell's, without the seed), its axis values, and how it is labelled."""

    id: str
    settings: dict[str, Any]  # precision, seed, and every setting axis's value

    @property
    def precision(self) -> str:
        return self.settings["precision"]


@dataclass(frozen=True)
class Plan:
    """Everything a fit needs, checked: the suite, the budget and limit, the axes and their ranges, the arms."""

    loaded: LoadedSuite
    budget: int
    margin: float
    axes: tuple[str, ...]
    ranges: dict[str, tuple[int, int]]
    arms: list[Arm]
    steps: int
    quality: bool
    device: str
    budget_source: str

    @property
    def limit(self) -> int:
        return int(self.budget * (1 - self.margin))


def with_device(plan: Plan, device: str) -> Plan:
    return replace(plan, device=device)


def arms_of(loaded: LoadedSuite, only: tuple[str, ...] | None = None) -> list[Arm]:
    """The grid's cells at its first seed, one arm each (the searched axes are not in the matrix)."""
    first_seed = loaded.suite.matrix.seeds[0]
    cells: list[Cell] = loaded.cells(only=only, seeds=(first_seed,))
    return [Arm(cell.id.removesuffix(f"-seed{cell.seed}"), cell.values()) for cell in cells]


def plan(loaded: LoadedSuite, budget: str | None, axes: tuple[str, ...] | None, margin: float | None = None,
         device: str = "cpu", only: tuple[str, ...] | None = None, quality: bool | None = None,
         model_limit: int | None = None, train_examples: int | None = None) -> Plan:
    """The fit asked for by the suite's [fit] table and the command line (which wins). SuiteError, one line per
    problem, first for the command line's (a budget that is not a size, an axis fit does not search), then for
    the suite's (no budget, no axis, an axis the task does not have or the matrix lists, a range the model or
    the data cannot take)."""
    suite, spec = loaded.suite, loaded.suite.fit
    given: list[str] = []
    budget_bytes = None
    if budget is not None:
        try:
            budget_bytes = sizes.parse_size(budget)
        except sizes.SizeError as error:
            given.append(f"--budget: {error}")
    if margin is not None and not 0 <= margin < 0.5:
        given.append(f"--margin: {margin:g} is not a share of the budget from 0 up to (not including) 0.5")
    if axes:
        given += fit_problems(suite, tuple(axes), "--axis", searching=True)
    if given:
        raise SuiteError(COMMAND_LINE, given)
    problems: list[str] = []
    chosen_axes = tuple(axes) if axes else (spec.axes if spec else ())
    if not chosen_axes:
        problems.append('fit.axes: the suite names no axis to search; add a [fit] table with axes = ["batch_size"] '
                        'or ["max_length"], or give --axis')
    elif not axes:  # the rest of fit.axes was checked with the suite; a searched axis listed in the matrix was not
        problems += fit_problems(suite, chosen_axes, "fit.axes", searching=True)
    source = "--budget"
    if budget_bytes is None:
        if spec is not None and spec.budget is not None:
            budget_bytes, source = spec.budget_bytes, "fit.budget"
        else:
            problems.append("fit.budget: no budget; give --budget SIZE (e.g. --budget 12GiB) or set fit.budget")
    ranges: dict[str, tuple[int, int]] = {}
    for axis in chosen_axes:
        found, line = _range(loaded, axis, model_limit, train_examples)
        if line:
            problems.append(line)
        else:
            ranges[axis] = found
    arms = arms_of(loaded, only)
    if not arms:
        problems.append("--only: no arm of the suite's matrix is left")
    if problems:
        raise SuiteError(loaded.path, problems)
    chosen_margin = margin if margin is not None else (spec.margin if spec else 0.0)
    return Plan(loaded, budget_bytes, chosen_margin, chosen_axes, ranges, arms, spec.steps if spec else 5,
                (spec.quality if spec else True) if quality is None else quality, device, source)


def _range(loaded: LoadedSuite, axis: str, model_limit: int | None, train_examples: int | None) -> tuple[tuple[int, int], str]:
    """The values searched for `axis`: fit.<axis>, else its default; or a line saying why it cannot be."""
    suite = loaded.suite
    given = getattr(suite.fit, axis, None) if suite.fit else None
    low = DEFAULT_LOW[axis] if suite.task != "clip" or axis != "batch_size" else 2
    if axis == "max_length":
        high = model_limit or suite.train.max_length
        if high is None:
            return (0, 0), "fit.max_length: the model states no length limit; give the range, e.g. max_length = [64, 4096]"
        if given and model_limit and given[1] > model_limit:
            return (0, 0), (f"fit.max_length: {given[1]} tokens, but model {suite.model.id!r} takes at most {model_limit}; "
                            f"end the range at {model_limit} or below")
    else:
        high = min(BATCH_HIGH, train_examples) if train_examples else BATCH_HIGH
        if given and train_examples and given[1] > train_examples and suite.task == "clip":
            return (0, 0), (f"fit.batch_size: {given[1]} is more than the {train_examples:,} training captions: each step "
                            "takes a full batch; end the range at that or below")
    low, high = given if given else (min(low, high), high)
    if axis == "max_length" and low < 2:
        return (0, 0), "fit.max_length: a training sequence needs at least 2 tokens"
    return (low, high), ""


# -- the search --------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One trial: what was predicted, what was measured, and whether it fitted."""

    arm: str
    axis: str
    value: int
    how: str  # why this value: estimate, exponential, bisection
    estimate: dict[str, Any]  # Prediction's phases and peak, before the trial
    measured: int | None
    fits: bool | None
    status: str
    reason: str | None
    phases: dict[str, int | None]
    speed: dict[str, float | None]
    quality: dict[str, Any]
    trial_dir: str | None

    @property
    def error(self) -> float | None:
        """(estimate - measured) / measured."""
        if not self.measured:
            return None
        return (self.estimate["peak"] - self.measured) / self.measured


@dataclass
class Search:
    """One arm's search along one axis, and its answer."""

    arm: str
    precision: str
    axis: str
    low: int
    high: int
    max_trials: int
    settings: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    largest: int | None = None  # the largest value that fitted
    smallest_over: int | None = None  # the smallest value that did not
    outcome: str = "running"  # found | all fit | none fit | refused | failed
    reason: str = ""
    estimate_unavailable: str | None = None  # why the estimate could not be made (the search then learns from trials)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["trials"] = [{**asdict(t), "error": t.error} for t in self.trials]
        return found


class Listener(Protocol):
    def estimated(self, search: Search, first: int, prediction: Prediction) -> None: ...
    def trial_started(self, search: Search, value: int, how: str, prediction: Prediction) -> None: ...
    def trial_finished(self, search: Search, trial: Trial) -> None: ...
    def search_finished(self, search: Search) -> None: ...


class QuietListener:
    def estimated(self, search: Search, first: int, prediction: Prediction) -> None:
        pass

    def trial_started(self, search: Search, value: int, how: str, prediction: Prediction) -> None:
        pass

    def trial_finished(self, search: Search, trial: Trial) -> None:
        pass

    def search_finished(self, search: Search) -> None:
        pass


RunTrial = Callable[[dict[str, Any], str], dict[str, Any]]  # (settings, name) -> record


def largest_predicted(model: ArmModel, low: int, high: int, limit: int) -> int | None:
    """The largest value in low..high whose predicted peak is within `limit` (the peak grows with the value), or
    None when even `low`'s is not."""
    if model.predict(low).peak > limit:
        return None
    lo, hi = low, high
    while lo < hi:
        middle = (lo + hi + 1) // 2
        if model.predict(middle).peak <= limit:
            lo = middle
        else:
            hi = middle - 1
    return lo


def next_value(search: Search, model: ArmModel, limit: int) -> tuple[int, str]:
    """The next value to try, and why (see the module's docstring): `estimate`, `exponential` or `bisection`."""
    fit = search.largest if search.largest is not None else search.low - 1
    over = search.smallest_over if search.smallest_over is not None else search.high + 1
    guess = largest_predicted(model, search.low, search.high, limit)
    guess = search.low - 1 if guess is None else guess
    if not search.trials:
        return min(max(guess, search.low), search.high), "estimate"
    # the estimate's largest fitting value, or (when that is known to fit already) the one above it
    candidate, how = min(max(guess, fit + 1), over - 1), "estimate"
    unmeasured = _unmeasured_run(search)
    if unmeasured:  # the last trials taught the estimate nothing (out of memory): double the step from the last
        last, step = search.trials[-1].value, 2 ** (unmeasured - 1)
        candidate = min(max(last + step if search.trials[-1].fits else last - step, fit + 1), over - 1)
        how = "exponential"
    used = len(search.trials)
    worst = max(candidate - fit - 1, over - candidate - 1)
    if used + 1 + math.ceil(math.log2(worst + 1)) > search.max_trials:
        return (fit + over) // 2, "bisection"
    return candidate, how


def _unmeasured_run(search: Search) -> int:
    """How many of the last trials, in a row, gave no peak to refit the estimate on."""
    count = 0
    for trial in reversed(search.trials):
        if trial.measured is not None:
            break
        count += 1
    return count


def refused_reason(model: ArmModel, search: Search, limit: int, budget: int) -> str | None:
    """Why no value of the search can fit, known before any trial (the exact parts alone exceed the limit)."""
    exact = model.exact_parts()
    if model.base_bytes > limit:
        return (f"the base alone needs {sizes.label(model.base_bytes)} in {search.precision}, more than the "
                f"{sizes.label(limit)} limit ({sizes.label(budget)} budget)")
    if exact > limit:
        return (f"the base, the LoRA adapters and the optimizer's state alone need {sizes.label(exact)}, more than the "
                f"{sizes.label(limit)} limit")
    return None


def search_arm(search: Search, model: ArmModel, limit: int, budget: int, run_trial: RunTrial, phase_key: str,
               listener: Listener) -> Search:
    """Run one search to its answer (or to a trial that cannot be judged)."""
    refused = refused_reason(model, search, limit, budget)
    if refused:
        search.outcome, search.reason = "refused", refused
        listener.search_finished(search)
        return search
    first, _ = next_value(search, model, limit)
    listener.estimated(search, first, model.predict(first))
    while True:
        fit = search.largest if search.largest is not None else search.low - 1
        over = search.smallest_over if search.smallest_over is not None else search.high + 1
        if over - fit <= 1:
            break
        value, how = next_value(search, model, limit)
        prediction = model.predict(value)
        listener.trial_started(search, value, how, prediction)
        record = run_trial({**search.settings, search.axis: value}, f"{search.arm}-{search.axis}{value}")
        trial = _trial(search, value, how, prediction, record, phase_key)
        search.trials.append(trial)
        listener.trial_finished(search, trial)
        if trial.fits is None:
            search.outcome = "failed"
            search.reason = f"the trial at {search.axis} = {value} could not be judged: {trial.reason}"
            break
        if trial.fits:
            search.largest = value if search.largest is None else max(search.largest, value)
        else:
            search.smallest_over = value if search.smallest_over is None else min(search.smallest_over, value)
        model.learn(value, record, phase_key)
    if search.outcome != "failed":
        if search.largest is None:
            search.outcome, search.reason = "none fit", f"even {search.axis} = {search.low} is over the limit"
        elif search.smallest_over is None:
            search.outcome, search.reason = "all fit", f"every value up to {search.high} fits (the range's end)"
        else:
            search.outcome = "found"
    listener.search_finished(search)
    return search


def _trial(search: Search, value: int, how: str, prediction: Prediction, record: dict[str, Any], phase_key: str) -> Trial:
    phases = {phase: record.get(f"memory.{phase}.{phase_key}") for phase in ("load", "prepare", "eval_before", "train", "eval_after")}
    return Trial(
        arm=search.arm, axis=search.axis, value=value, how=how,
        estimate={"load": prediction.load, "train": prediction.train, "eval": prediction.eval, "peak": prediction.peak,
                  "phase": prediction.phase},
        measured=record.get("fit.peak_bytes"), fits=record.get("fit.within_budget"), status=str(record.get("status")),
        reason=record.get("fit.verdict_reason") or record.get("error"), phases=phases,
        speed={key: record.get(f"speed.{key}") for key in ("train_samples_per_s", "train_tokens_per_s",
                                                           "train_samples_per_cpu_s", "train_tokens_per_cpu_s")}
        | {"contended": record.get("speed.contended")},
        quality={k: v for k, v in record.items() if k.startswith("quality.")},
        trial_dir=record.get("fit.trial_dir"),
    )


def curve_models(answer: dict[str, Any], axis: str, arm: Arm) -> ArmModel:
    """The arm's ArmModel along `axis` from the estimate child's answer for the sampled values; without one
    (`unavailable`), a model that knows nothing but that the peak grows with the value: its first trial is the
    range's end, and each trial refits it."""
    from qbench.runner.estimate import LOAD_QUANTIZE_TRANSIENT, optimizer_state_bytes

    if "unavailable" in answer:
        return ArmModel(base_bytes=0, adapter_bytes=0, optimizer_bytes=0, load_bytes=0, train=Curve([1], [1]),
                        eval=Curve([1], [1]), evaluates=True)

    points = [p for p in answer["points"] if _same_arm(p["axes"], arm, axis)]
    points.sort(key=lambda p: p["axes"][axis])
    values = [p["axes"][axis] for p in points]
    base = answer["base"][arm.precision]
    first = points[0]
    load = (answer.get("checkpoint_bytes") or 0) + base["bytes"] + LOAD_QUANTIZE_TRANSIENT * base["largest_linear_bytes"]
    return ArmModel(
        base_bytes=base["bytes"], adapter_bytes=first["lora_bytes"],
        optimizer_bytes=optimizer_state_bytes(arm.settings["optimizer"], first["lora_elements"]),
        load_bytes=load,
        train=Curve(values, [p["train_bytes"][arm.precision] for p in points]),
        eval=Curve(values, [p["eval_bytes"][arm.precision] for p in points]),
        evaluates=True,
    )


def _same_arm(point: dict[str, Any], arm: Arm, axis: str) -> bool:
    return all(point.get(name) == value for name, value in arm.settings.items() if name in point and name != axis)


def estimate_points(plan: Plan, axis: str) -> list[dict[str, Any]]:
    """The meta-device points the estimate needs for `axis`: each arm's other axes at sampled values of `axis`."""
    low, high = plan.ranges[axis]
    samples = sample_values(low, high)
    points, seen = [], set()
    for arm in plan.arms:
        others = {name: value for name, value in arm.settings.items() if name in grid.BY_NAME and name not in ("precision", "seed")}
        for value in samples:
            axes = {**others, axis: value}
            key = tuple(sorted(axes.items()))
            if key not in seen:
                seen.add(key)
                points.append({"axes": axes})
    return points


# -- a whole fit ---------------------------------------------------------------------------------------------------


def phase_key(device: str) -> str:
    """The per-phase record key fit learns from: the figure its verdict is made of (qbench.cell.budget)."""
    return "torch_reserved_peak_bytes" if device.startswith("cuda") else "torch_cpu_increase_peak_bytes"


def suite_limits(loaded: LoadedSuite) -> tuple[int | None, int | None]:
    """(the model's longest sequence, the number of training examples of a clip suite): the default ranges' ends."""
    from transformers import AutoConfig

    from qbench.cell import models
    from qbench.contract import lengths
    from qbench.runner import preflight

    suite = loaded.suite
    try:
        path = models.resolve(suite.model.id, loaded.path.parent, suite.model.revision)
        config = AutoConfig.from_pretrained(path, revision=suite.model.revision, trust_remote_code=suite.model.trust_remote_code)
        limit = lengths.model_limit(suite.task, config).tokens
    except Exception:  # preflight says what is wrong with the model, in its own words
        limit = None
    _, found = preflight._check_data(loaded)
    return limit, found.train_examples


def check(plan: Plan) -> None:
    """SuiteError (nothing has run) for a suite that cannot run as its largest trial: data, model, LoRA targets,
    every length against the model, the largest batch against the training data; and, on a CPU, a budget larger
    than the machine's memory (nothing caps a CPU trial: one that fits such a budget could exhaust the machine)."""
    from qbench.runner import preflight
    from qbench.runner.estimate import device_memory
    from qbench.runner.trial import trial_suite

    if plan.device == "cpu":
        total, what = device_memory("cpu")
        if plan.budget > total:
            raise SuiteError(COMMAND_LINE if plan.budget_source == "--budget" else plan.loaded.path, [
                f"{plan.budget_source}: {sizes.label(plan.budget)} is more than the {sizes.label(total)} {what}: a CPU "
                "trial is not capped, so one that fits the budget could exhaust the machine; give a smaller budget"])
    preflight.check_suite(plan.loaded)
    largest = {axis: high for axis, (_, high) in plan.ranges.items()}
    preflight.check_suite(trial_suite(plan.loaded, {**plan.arms[0].settings, **largest}, plan.budget, plan.steps))


def estimate_request(plan: Plan, axis: str, compute_dtype: str) -> dict[str, Any]:
    points = estimate_points(plan, axis)
    return {"suite_text": plan.loaded.source_text(), "suite_path": str(plan.loaded.path), "device": plan.device,
            "compute_dtype": compute_dtype, "precisions": list(dict.fromkeys(a.precision for a in plan.arms)), "points": points}


def searches_for(plan: Plan, answers: dict[str, dict[str, Any]]) -> list[tuple[Search, ArmModel]]:
    """One search per arm and axis, each with its model, in the order they run (axis by axis)."""
    found = []
    for axis in plan.axes:
        low, high = plan.ranges[axis]
        for arm in plan.arms:
            model = curve_models(answers[axis], axis, arm)
            search = Search(arm.id, arm.precision, axis, low, high, bound(low, high), dict(arm.settings),
                            estimate_unavailable=answers[axis].get("unavailable"))
            found.append((search, model))
    return found


def unfittable(plan: Plan, pairs: list[tuple[Search, ArmModel]]) -> list[str]:
    """One line when no arm can fit at all (the exact parts of every arm exceed the limit): exit 2 before any trial."""
    reasons = [refused_reason(model, search, plan.limit, plan.budget) for search, model in pairs]
    if not pairs or not all(reasons):
        return []
    bases = ", ".join(f"{p} {sizes.label(b)}" for p, b in dict((s.precision, m.base_bytes) for s, m in pairs).items())
    return [f"{plan.budget_source}: {sizes.label(plan.budget)} ({plan.budget:,} bytes) is below what the base alone, with "
            f"its LoRA adapters and optimizer state, needs in every precision searched (base: {bases}); no trial can fit"]


def run_searches(plan: Plan, pairs: list[tuple[Search, ArmModel]], run_trial: RunTrial, listener: Listener) -> list[Search]:
    """Every search, one after another; an arm's first prediction takes the activation scale an earlier arm of the
    same kind of precision learned."""
    from qbench.contract import precisions

    learned: dict[tuple[str, str], ArmModel] = {}
    key = phase_key(plan.device)
    for search, model in pairs:
        kind = (search.axis, precisions.get(search.precision).kind)
        if kind in learned:
            model.train_scale, model.eval_scale = learned[kind].train_scale, learned[kind].eval_scale
            model.held_extra = learned[kind].held_extra
        search_arm(search, model, plan.limit, plan.budget, run_trial, key, listener)
        if search.trials:
            learned[kind] = model
    return [search for search, _ in pairs]


def result(plan: Plan, answers: dict[str, dict[str, Any]], searches: list[Search], quality: dict[str, dict[str, Any]],
           started: str, finished: str, compute_dtype: str) -> dict[str, Any]:
    """fit.json: the question, the estimate's exact parts, every search with its trials, and each arm's quality."""
    from qbench import __version__
    from qbench.cell.budget import CPU_SOURCE, CUDA_SOURCE

    suite = plan.loaded.suite
    return {
        "qbench_version": __version__,
        "suite": suite.name, "suite_path": str(plan.loaded.path), "task": suite.task, "model": suite.model.id,
        "device": plan.device, "compute_dtype": compute_dtype,
        "budget_bytes": plan.budget, "budget_source": plan.budget_source, "margin": plan.margin, "limit_bytes": plan.limit,
        "judged": CUDA_SOURCE if plan.device.startswith("cuda") else CPU_SOURCE,
        "axes": list(plan.axes), "ranges": {k: list(v) for k, v in plan.ranges.items()}, "trial_steps": plan.steps,
        "suite_settings": {"batch_size": suite.train.batch_size, "max_length": suite.train.max_length,
                           "grad_accum": suite.train.grad_accum, "steps": suite.train.steps},
        "estimate": {axis: {"checkpoint_bytes": a.get("checkpoint_bytes"), "base": a.get("base"),
                            "max_positions": a.get("max_positions"), "unavailable": a.get("unavailable")}
                     for axis, a in answers.items()},
        "searches": [s.to_dict() for s in searches],
        "quality": quality,
        "created": started, "finished": finished,
    }


def quality_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of an arm's run at the suite's own settings."""
    keep = ("status", "error", "config.train.batch_size", "config.train.max_length", "config.train.steps", "fit.peak_bytes",
            "fit.within_budget", "speed.train_samples_per_s", "speed.train_tokens_per_s", "fit.trial_dir")
    return {**{k: record.get(k) for k in keep}, **{k: v for k, v in record.items() if k.startswith(("quality.", "interval."))}}


@dataclass
class FitRun:
    """A finished fit: its folder and fit.json's content."""

    folder: Any
    result: dict[str, Any]

    @property
    def failed(self) -> list[str]:
        return [f"{s['arm']} {s['axis']}: {s['reason']}" for s in self.result["searches"] if s["outcome"] == "failed"]


def execute(plan: Plan, out: Any, listener: Listener, thread_plan: Any, launcher: str = "auto",
            trial_listener: Any = None, on_start: Callable[[Any, Any], None] | None = None) -> FitRun:
    """Run the fit: settle device and launcher, estimate every arm (SuiteError, before any trial, when no arm can fit
    at all), run the searches and each arm's quality run, and write OUT/<suite>/fit-<time>/fit.json. `on_start`
    sees (the run start, the fit's folder) before the first trial."""
    from datetime import UTC, datetime
    from pathlib import Path

    from qbench.contract import files
    from qbench.runner import executors
    from qbench.runner.executors.base import Request
    from qbench.runner.scheduler import LOCAL_SLOT
    from qbench.runner.trial import TrialRunner

    started = datetime.now(UTC).isoformat(timespec="seconds")
    cells = plan.loaded.cells(seeds=(plan.loaded.suite.matrix.seeds[0],))
    # trials are cells of this machine, started as `qbench run` starts them (qbench.runner.executors.local)
    executor = executors.create({"auto": "local"}.get(launcher, launcher))
    begun = folder = None
    try:
        executor.prepare(Request(plan.loaded, cells, plan.device, thread_plan, [LOCAL_SLOT]))
        begun = executor.started
        plan = with_device(plan, begun.device)
        answers = {axis: _estimate(executor.server, plan, axis, begun.compute.dtype) for axis in plan.axes}
        pairs = searches_for(plan, answers)
        refused = unfittable(plan, pairs)
        if refused:
            raise SuiteError(COMMAND_LINE if plan.budget_source == "--budget" else plan.loaded.path, refused)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        folder = files.create_dir_exclusive(files.child(Path(out), plan.loaded.suite.name, "suite name"), f"fit-{stamp}", "--out")
        if on_start is not None:
            on_start(begun, folder)
        trials = TrialRunner(folder / "trials", begun.device, executor, begun.compute, begun.threads, trial_listener)

        def run_trial(settings: dict[str, Any], name: str, steps: int | None = plan.steps) -> dict[str, Any]:
            return trials.run_trial(plan.loaded, settings, plan.budget, steps, name)

        quality: dict[str, dict[str, Any]] = {}
        try:
            run_searches(plan, pairs, run_trial, listener)
            if plan.quality:
                for arm in plan.arms:
                    quality[arm.id] = quality_fields(run_trial(arm.settings, f"{arm.id}-suite-settings", None))
        except BaseException as stop:  # interrupted, or the output cannot be written: keep what was found so far
            found = result(plan, answers, [s for s, _ in pairs], quality, started,
                           datetime.now(UTC).isoformat(timespec="seconds"), begun.compute.dtype)
            found["stopped"] = f"{type(stop).__name__}: {stop}"
            try:
                files.write_json_atomic(folder / "fit.json", found)
            except OSError:
                pass
            raise
        found = result(plan, answers, [s for s, _ in pairs], quality, started,
                       datetime.now(UTC).isoformat(timespec="seconds"), begun.compute.dtype)
        files.write_json_atomic(folder / "fit.json", found)
        return FitRun(folder, found)
    finally:
        executor.close(folder)


def _estimate(server: Any, plan: Plan, axis: str, compute_dtype: str) -> dict[str, Any]:
    """The estimate child's answer for `axis`; when it cannot trace the model on the meta device, an answer that
    knows nothing (`unavailable`: why), so the search goes on from its trials alone."""
    from qbench.runner.estimate import run_estimate_child

    try:
        return run_estimate_child(server, estimate_request(plan, axis, compute_dtype))
    except RuntimeError as error:
        return {"unavailable": str(error)}
