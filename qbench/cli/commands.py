"""The commands behind `qbench run | env | report | compare | baseline | list`: parse, call the library, render."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from qbench.cli import render
from qbench.cli.render import console, echo, errors, plain
from qbench.contract import optimizers, precisions
from qbench.contract.exitcodes import Exit
from qbench.contract.suite import SuiteError
from qbench.runner import executors
from qbench.runner.plan import COMMAND_LINE

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Settings
    from qbench.runner.executors.base import Executor


def cmd_run(args: argparse.Namespace) -> int:
    from qbench.runner import api

    if args.resume is not None:
        return _resume(args)
    if not args.suite:
        raise SuiteError(COMMAND_LINE, ["qbench run needs a suite file (or --resume RUN_DIR)"])
    if args.force:
        raise SuiteError(COMMAND_LINE, ["--force only goes with --resume"])
    executor = _executor(args)
    with render.RunDisplay() as display:
        result = api.run_suite(args.suite, out=args.out, executor=executor, only=args.only, seeds=args.seeds,
                               where=args.where, shard=args.shard, device=args.device, gpus=args.gpus,
                               gpus_per_cell=args.gpus_per_cell, threads=args.threads, parallel=args.parallel,
                               check_only=args.check, listener=display)
    return render.run_result(result)


# each executor option of the command line: (the executor's constructor argument, the option's value in args)
EXECUTOR_OPTIONS = {
    "--ray-address": ("address", "ray_address"),
    "--cpus-per-cell": ("cpus_per_cell", "cpus_per_cell"),
    "--slurm-partition": ("partition", "slurm_partition"),
    "--slurm-time-min": ("time_min", "slurm_time_min"),
    "--slurm-option": ("parameters", "slurm_option"),
}


def _executor(args: argparse.Namespace, default: str | None = executors.DEFAULT) -> Executor | str | None:
    """The executor `--executor` (and `--launcher`, its older spelling for this machine's two) names: the name,
    or the executor made with its own options; SuiteError for an option it does not take. None: no executor
    asked for and no `default`."""
    name = args.executor
    if args.launcher not in (None, "auto"):
        if name not in (None, executors.DEFAULT, args.launcher):
            if args.launcher == "forkserver":
                raise SuiteError(COMMAND_LINE, [f"--launcher forkserver: with --executor {name} each cell is its own "
                                                "job's process; leave --launcher out (auto)"])
        else:
            name = args.launcher
    name = name or default
    given = {flag: getattr(args, attribute) for flag, (_, attribute) in EXECUTOR_OPTIONS.items()
             if getattr(args, attribute) not in (None, [])}
    if name is None:
        if given:
            raise SuiteError(COMMAND_LINE, [f"{', '.join(given)} go(es) with --executor; name one"])
        return None
    cls = executors.get(name)
    wrong = [flag for flag in given if EXECUTOR_OPTIONS[flag][0] not in cls.OPTIONS]
    if wrong:
        takers = {flag: [n for n in executors.REGISTRY if EXECUTOR_OPTIONS[flag][0] in executors.get(n).OPTIONS] for flag in wrong}
        raise SuiteError(COMMAND_LINE, [f"{flag} goes with --executor {' or '.join(takers[flag])}" for flag in wrong])
    options: dict[str, Any] = {EXECUTOR_OPTIONS[flag][0]: value for flag, value in given.items()}
    if "parameters" in options:
        options["parameters"] = _key_values(options["parameters"], "--slurm-option")
    return cls(**options) if options else name


def _key_values(texts: list[str], option: str) -> dict[str, Any]:
    """`KEY=VALUE` texts -> {key: value} (a whole number stays a number); SuiteError naming `option`."""
    values: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise SuiteError(COMMAND_LINE, [f"{option} {text!r}: expected KEY=VALUE, e.g. account=myproject"])
        values[key.strip()] = int(value) if value.strip().isdigit() else value
    return values


def _resume(args: argparse.Namespace) -> int:
    from qbench.runner import api

    given = [
        flag
        for flag, used in (
            ("SUITE", args.suite is not None), ("--only", args.only is not None), ("--seeds", args.seeds is not None),
            ("--where", args.where), ("--device", args.device != "auto"), ("--out", args.out != "results"),
            ("--check", args.check), ("--threads", args.threads is not None), ("--launcher", args.launcher != "auto"),
        )
        if used
    ]
    if given:
        raise SuiteError(COMMAND_LINE, [f"--resume takes its settings from RUN_DIR/run.json; drop {', '.join(given)}"])
    if args.shard is not None:
        raise SuiteError(COMMAND_LINE, ["--shard does not go with --resume: the run folder already holds its shard's cells"])
    executor = _executor(args, default=None)
    with render.RunDisplay() as display:
        result = api.resume_run(args.resume, executor=executor, force=args.force, gpus=args.gpus,
                                gpus_per_cell=args.gpus_per_cell, parallel=args.parallel, listener=display)
    return render.run_result(result)


def cmd_list(args: argparse.Namespace) -> int:
    from qbench.cell.models import BUILTIN_MODELS
    from qbench.contract.tasks import BUILTIN_DATASETS

    shown = Table(title="precisions (matrix.precisions)")
    shown.add_column("name")
    shown.add_column("base weights")
    for name, precision in precisions.REGISTRY.items():
        shown.add_row(plain(name), plain(precision.description))
    console.print(shown)
    shown = Table(title="optimizers (train.optimizer, matrix.optimizers)")
    shown.add_column("name")
    shown.add_column("what")
    for name, optimizer in optimizers.REGISTRY.items():
        shown.add_row(plain(name), plain(optimizer.description))
    console.print(shown)
    shown = Table(title="builtin models (model.id = \"builtin:NAME\")")
    shown.add_column("name")
    shown.add_column("what")
    for name, what in BUILTIN_MODELS.items():
        shown.add_row(plain(name), plain(what))
    console.print(shown)
    shown = Table(title="builtin datasets (data.kind = \"builtin\", data.name = NAME)")
    shown.add_column("name")
    shown.add_column("task")
    shown.add_column("what")
    for name, (task, what) in BUILTIN_DATASETS.items():
        shown.add_row(plain(name), plain(task), plain(what))
    console.print(shown)
    return Exit.OK


def cmd_env(args: argparse.Namespace) -> int:
    from qbench.machine.environment import machine_report

    if args.json:  # nothing but the JSON on standard output
        report = machine_report(args.device, args.compute_dtype)
        print(json.dumps(report, indent=1))
    else:
        with console.status("probing torch, CUDA, NVML and every weight format ..."):
            report = machine_report(args.device, args.compute_dtype)
        render.machine(report)
    return Exit.OK if "probe_error" not in report else Exit.FAILED


def cmd_report(args: argparse.Namespace) -> int:
    """Exit 0 with a report; 2 (one line) when an input holds no records, a file that is not a record, or
    records of different suites or settings (which are never averaged together), or when the report folder
    cannot be written or holds other files."""
    from qbench.analysis import load
    from qbench.analysis.report import write
    from qbench.contract import files
    from qbench.contract import records as results
    from qbench.runner import api

    try:
        frame = load.load_results(args.run_dirs)
    except results.ResultsError as problem:
        render.error(str(problem))
        return Exit.BAD_INPUT
    mixed = load.identity_differences(frame)
    if mixed:
        render.error(
            f"{', '.join(args.run_dirs)}: the records describe different experiments and are not merged into one "
            f"report ({'; '.join(mixed[:3])}{f'; and {len(mixed) - 3} more' if len(mixed) > 3 else ''}); "
            "report each suite on its own"
        )
        return Exit.BAD_INPUT
    out = Path(args.out) if args.out else write.default_report_dir([Path(p) for p in args.run_dirs])
    shown = write.report_sections(frame, api.report_settings(args.run_dirs))
    try:
        paths = write.write_report(frame, out, args.title, shown=shown)
    except (files.NotOwned, OSError) as problem:
        render.error(str(problem) if isinstance(problem, files.NotOwned) else str(files.OutputError.from_os_error(out, problem)))
        return Exit.BAD_INPUT
    render.sections(shown)
    console.print(f"{len(frame)} cells from {len(args.run_dirs)} input(s) -> html: {echo(paths['html'])}", highlight=False)
    console.print(f"also: {echo(paths['markdown'])}  {echo(paths['csv'])}  {echo(paths['parquet'])}  "
                  f"{echo(paths['summary_csv'])}", highlight=False)
    render.answer(shown)
    return Exit.OK


def _compare_settings(args: argparse.Namespace, new_paths: list[str]) -> Settings:
    """The suite's [compare] table (--suite, else the new run's own suite text), then --tolerance over it."""
    from qbench.analysis.gate import compare
    from qbench.contract.suite import load

    overrides = [compare.parse_tolerance(text) for text in args.tolerance or []]
    if args.suite:
        loaded = load(args.suite)
        return compare.Settings.build(loaded.suite.compare, overrides, args.noise_sigmas, f"suite {args.suite}")
    return compare.settings_of_runs(new_paths, overrides, args.noise_sigmas)


def _markdown_targets(args: argparse.Namespace) -> list[str]:
    """Where the Markdown verdict goes: --markdown, then $GITHUB_STEP_SUMMARY; SuiteError when one is a folder."""
    targets = [args.markdown] if args.markdown else []
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        targets.append(os.environ["GITHUB_STEP_SUMMARY"])
    for target, option in zip(targets, (["--markdown"] if args.markdown else []) + ["$GITHUB_STEP_SUMMARY"], strict=False):
        if target != "-" and Path(target).is_dir():
            raise SuiteError(COMMAND_LINE, [f"{option}: {target} is a folder; name a file to append the summary to"])
    return targets


def _write_markdown(markdown: str, targets: list[str]) -> str | None:
    """Append `markdown` to each target ('-': standard output); one line saying what could not be written, or None."""
    for target in targets:
        try:
            if target == "-":
                sys.stdout.write(markdown + "\n")
            else:
                with open(target, "a", encoding="utf-8") as handle:
                    handle.write(markdown + "\n")
        except OSError as error:
            return f"cannot write the Markdown summary to {target}: {error.strerror or error}"
    return None


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0: no regression; 1: regression; 2: unusable input (nothing comparable, unreadable records,
    different experiments), or the Markdown summary cannot be written."""
    from qbench.analysis import load
    from qbench.analysis.gate import compare
    from qbench.contract import records as results

    targets = _markdown_targets(args)
    try:
        settings = _compare_settings(args, [args.new])
        baseline = load.load_results([args.baseline])
        new = load.load_results([args.new])
    except SuiteError as problem:
        comparison = compare.Comparison.unusable([f"{problem.path}: {p}" for p in problem.problems], args.baseline, args.new)
    except (results.ResultsError, ValueError) as problem:
        comparison = compare.Comparison.unusable([str(problem)], args.baseline, args.new)
    else:
        comparison = compare.compare(baseline, new, settings, args.baseline, args.new)
    unwritten = _write_markdown(comparison.markdown(), targets)
    render.comparison(comparison)
    if unwritten:
        render.error(unwritten)
        return Exit.BAD_INPUT
    return comparison.exit_code


def cmd_baseline_refresh(args: argparse.Namespace) -> int:
    """Exit 0 when the baseline was replaced; 1 when a cell did not finish; 2 (before any cell) when the code
    is not a clean commit, the baselines folder cannot be written or the old baseline folder holds anything
    but an earlier baseline of this suite, or when the new baseline cannot be written (the old one is then
    left as it was)."""
    from qbench.analysis.gate import baseline
    from qbench.contract import records as results
    from qbench.contract.files import OutputError
    from qbench.contract.suite import load
    from qbench.machine.environment import git_commit
    from qbench.runner import api

    loaded = load(args.suite)
    try:  # before any cell: the runs would measure code that no commit holds
        baseline.check_commit(git_commit(), args.allow_dirty)
    except baseline.BaselineError as problem:
        render.error(str(problem))
        return Exit.BAD_INPUT
    out = Path(args.out)
    api.check_out_folder(out, "--out")
    try:
        target = baseline.target_dir(out, loaded.suite.name)
    except baseline.BaselineError as problem:
        raise SuiteError(loaded.path, [f"name: {problem}"]) from None
    problem = baseline.replace_problem(target, loaded.suite.name)
    if problem:
        raise SuiteError(COMMAND_LINE, [f"--out: {problem}; it is not replaced (move it away first)"])
    with tempfile.TemporaryDirectory(prefix="qbench-baseline-") as scratch:
        for repeat in range(args.repeats):
            if args.repeats > 1:
                console.print(f"repeat {repeat + 1:d} of {args.repeats:d}")
            with render.RunDisplay() as display:
                result = api.run_suite(loaded, out=scratch, device=args.device, threads=args.threads, listener=display)
            code = render.run_result(result, resumable=False)  # its scratch folder goes when this command ends
            if code != Exit.OK:
                errors.print(f"[red]the run did not finish cleanly (exit {code:d}); the baseline is left as it was[/]"
                             + (" (a refresh runs every cell again: there is nothing to resume)" if result.interrupted else ""))
                return code
        try:
            target = baseline.install(results.find_run_dirs(scratch), out, loaded.suite.name, args.allow_dirty)
        except baseline.BaselineError as problem:
            render.error(str(problem))
            return Exit.FAILED
        except OSError as error:
            render.error(f"{OutputError.from_os_error(target, error)}; the baseline is left as it was")
            return Exit.BAD_INPUT
    console.print(f"baseline of suite [bold]{echo(loaded.suite.name)}[/] refreshed: {echo(target)} — review the diff and commit it",
                  highlight=False)
    return Exit.OK


def cmd_gate(args: argparse.Namespace) -> int:
    """Exit 0: no regression; 1: regression; 2: unusable input (the suite, the baseline, no git checkout or
    commit to take the baseline's code from), or the Markdown summary or history cannot be written."""
    from qbench.runner import gate

    targets = _markdown_targets(args)
    for option, value in (("--processes", args.processes), ("--blocks", args.blocks)):
        if value is not None and value < 1:
            raise SuiteError(COMMAND_LINE, [f"{option} {value}: needs at least 1"])
    with render.GateProgress() as progress:
        try:
            result = gate.run_gate(args.suite, args.baseline, against=args.against, out=args.out, device=args.device,
                                   processes=args.processes, blocks=args.blocks, on_block=progress.block)
        except gate.GateError as problem:
            render.error(str(problem))
            return Exit.BAD_INPUT
    unwritten = _write_markdown(result.comparison.markdown(), targets)
    render.comparison(result.comparison)
    render.gate_end(result)
    if args.history and not result.comparison.problems:
        unwritten = unwritten or _append_history(args.history, result)
    if unwritten:
        render.error(unwritten)
        return Exit.BAD_INPUT
    return result.comparison.exit_code


def _append_history(store: str, result: Any) -> str | None:
    """Append the gate run to the history store; one line when it cannot be written, else None."""
    import sqlite3

    from qbench.analysis import load
    from qbench.analysis.gate import history
    from qbench.runner.gate import NEW_SIDE

    new = load.load_results(result.runs.run_dirs(NEW_SIDE))
    machine, description = history.machine_fingerprint(new)
    commits = sorted({str(c) for c in new.get("env.git_commit", []) if isinstance(c, str)})
    hosts = sorted({str(h) for h in new.get("env.hostname", []) if isinstance(h, str)})
    suites = sorted({str(h) for h in new.get("suite", []) if isinstance(h, str)})
    comparison = result.comparison
    verdict = "regression" if comparison.exit_code == Exit.FAILED else "ok"
    run = history.GateRun(suites[0] if suites else None, commits[0] if commits else None, result.commit, machine, description,
                          hosts[0] if hosts else None, verdict, int(comparison.exit_code), result.seconds,
                          os.environ.get("QBENCH_HISTORY_LABEL"))
    try:
        run_id = history.append(store, run, comparison.checks)
    except (OSError, sqlite3.Error) as error:
        return f"cannot append to the history store {store}: {error}"
    console.print(f"history: gate run {run_id:d} appended to {echo(store)}", highlight=False)
    return None


def cmd_history(args: argparse.Namespace) -> int:
    """Exit 0 with the table (and the plot); 2 when the store cannot be read or holds no matching figure."""
    from qbench.analysis.gate import history

    try:
        runs, figures = history.read(args.store)
    except history.HistoryError as problem:
        render.error(str(problem))
        return Exit.BAD_INPUT
    patterns = tuple(args.figure) if args.figure else history.MAIN_FIGURES
    table = history.series(runs, figures, patterns, args.last)
    if table.empty:
        render.error(f"{args.store}: no figure matching {', '.join(patterns)} in {len(runs)} gate run(s)")
        return Exit.BAD_INPUT
    chosen = runs[runs["id"].isin(table.columns)]
    found = history.steps(table, chosen, args.min_change)
    target = Path(args.plot) if args.plot else Path(args.store).with_suffix(".png")
    try:
        history.plot(table, chosen, found, target)
    except OSError as error:
        render.error(f"cannot write the plot {target}: {error.strerror or error}")
        return Exit.BAD_INPUT
    render.history(table, chosen, found, target)
    return Exit.OK
