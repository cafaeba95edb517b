"""`qbench fit`: the largest batch_size / max_length per arm within a memory budget (qbench.runner.fit), rendered."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from qbench.cli.render import console, echo, errors
from qbench.contract import sizes
from qbench.contract.exitcodes import Exit

Commands = Any


def add_parser(commands_: Commands) -> None:
    fit = commands_.add_parser(
        "fit",
        help="the largest batch_size and/or max_length per precision that trains within a memory budget",
        description="For each arm of SUITE (each precision, and each value of the matrix's other axes), find the largest "
        "batch_size and/or max_length that trains within --budget: each trial is one fresh cell of a few optimizer "
        "steps (with the suite's evaluation), the first where the estimate puts the limit, then exponential steps and "
        "bisection; at most ceil(log2(range)) + 3 trials per arm. On a CPU the figure judged is the peak of the "
        "bytes torch's tensors hold above the process baseline; on CUDA the process is capped at the budget. "
        "Writes OUT/<suite>/fit-<time>/ (fit.json, fit.md, fit.csv, fit-trials.csv, plots/fit.png, one run folder "
        "per trial). Exit 0 when every search found its answer, 1 when a trial could not be judged, 2 on bad "
        "input (nothing run). See docs/fit.md.",
    )
    fit.add_argument("suite", help="suite file, e.g. suites/fit-llm.toml (its [fit] table gives the defaults)")
    fit.add_argument("--budget", metavar="SIZE",
                     help=f"memory per cell, e.g. 24GiB, 800MiB, 12GB; units: {sizes.ACCEPTED} (default: fit.budget)")
    fit.add_argument("--axis", action="append", metavar="AXIS",
                     help="batch_size or max_length; repeat for both (default: fit.axes)")
    fit.add_argument("--margin", type=float, metavar="SHARE",
                     help="share of the budget kept free, e.g. 0.1: a value fits when its peak is at most "
                     "(1 - margin) x budget (default: fit.margin, else 0)")
    fit.add_argument("--only", metavar="PRECISIONS", help="comma-separated subset of the matrix's precisions")
    fit.add_argument("--out", default="results", help="folder for fit folders (default: results)")
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    fit.add_argument("--threads", type=int, metavar="N", help="torch threads per cell (default: the suite's, else the cores)")
    fit.add_argument("--launcher", choices=("auto", "forkserver", "subprocess"), default="auto",
                     help="how trial processes start (as for qbench run)")
    fit.add_argument("--no-quality", action="store_true",
                     help="skip each arm's run at the suite's own settings (the report's quality column)")
    fit.add_argument("--check", action="store_true", help="check the input and print the plan; run nothing")
    fit.set_defaults(handler=cmd_fit)


class FitProgress:
    """Prints each search's start, each trial's estimate and measurement, and each answer."""

    def estimated(self, search: Any, first: int, prediction: Any) -> None:
        if search.estimate_unavailable:
            console.print(f"[bold]{echo(search.arm)}[/] {echo(search.axis)} {echo(search.low)}..{echo(search.high)} (at most {echo(search.max_trials)} "
                          f"trials): [yellow]no estimate[/] ({echo(search.estimate_unavailable)}); the trials alone "
                          "guide the search", highlight=False)
            return
        console.print(f"[bold]{echo(search.arm)}[/] {echo(search.axis)} {echo(search.low)}..{echo(search.high)} (at most {echo(search.max_trials)} "
                      f"trials): the estimate puts the limit at {echo(first)} ({echo(sizes.label(prediction.peak))} there)", highlight=False)

    def trial_started(self, search: Any, value: int, how: str, prediction: Any) -> None:
        console.print(f"  trial {len(search.trials) + 1:d}: {echo(search.axis)} = {echo(value)} ({echo(how)}), estimate "
                      f"{echo(sizes.label(prediction.peak))} ({echo(prediction.phase)}) ...", end="", highlight=False)

    def trial_finished(self, search: Any, trial: Any) -> None:
        if trial.fits is None:
            console.print(f" [red]not judged[/]: {echo(str(trial.reason))}", highlight=False)
            return
        error = f"{100 * trial.error:+.1f} %" if trial.error is not None else "n/a"
        verdict = "[green]fits[/]" if trial.fits else "[yellow]over[/]"
        console.print(f" measured {echo(sizes.label(trial.measured))} ({echo(error)}) {verdict:s}", highlight=False)  # our markup

    def search_finished(self, search: Any) -> None:
        answer = {"found": f"largest {search.axis} = {search.largest}", "all fit": f"{search.axis} >= {search.largest}",
                  "none fit": "nothing fits", "refused": "refused", "failed": "not answered"}[search.outcome]
        reason = "" if search.outcome == "found" else ": " + echo(search.reason)
        console.print(f"  -> {echo(search.arm)}: {echo(answer)}{reason:s}", highlight=False)


def cmd_fit(args: argparse.Namespace) -> int:
    from qbench.analysis.report import fit as fit_report
    from qbench.contract.suite import load
    from qbench.machine import threads
    from qbench.runner import fit, runner
    from qbench.runner.api import check_out_folder
    from qbench.runner.executors.local import check_cuda_seen

    loaded = load(args.suite)
    out = Path(args.out)
    check_out_folder(out, "--out")
    only = tuple(p.strip() for p in args.only.split(",") if p.strip()) if args.only else None
    model_limit, examples = fit.suite_limits(loaded)
    plan = fit.plan(loaded, args.budget, tuple(args.axis) if args.axis else None, args.margin, "cpu", only,
                    False if args.no_quality else None, model_limit, examples)
    if args.device == "cuda":
        check_cuda_seen("--device cuda")
    device = runner.resolve_device(args.device)
    plan = fit.with_device(plan, device)
    fit.check(plan)
    ranges = ", ".join(f"{axis} {low}..{high} (at most {fit.bound(low, high)} trials per arm)" for axis, (low, high) in plan.ranges.items())
    console.print(f"fit [bold]{echo(loaded.suite.name)}[/]: {len(plan.arms)} arm(s) ({echo(', '.join(a.id for a in plan.arms))}), "
                  f"{echo(ranges)}; budget {plan.budget:,} bytes = {echo(sizes.label(plan.budget))} ({echo(plan.budget_source)}), margin {plan.margin:g}, "
                  f"on {echo(device)}",
                  highlight=False)
    from qbench.cell.budget import CPU_SOURCE, CUDA_SOURCE

    console.print(f"judged: {echo(CUDA_SOURCE if device.startswith('cuda') else CPU_SOURCE)}", highlight=False)
    if args.check:
        console.print("the input passes every check; nothing was run (--check)")
        return Exit.OK
    thread_plan = threads.plan(args.threads, loaded.suite.threads, 1)
    done = fit.execute(plan, out, FitProgress(), thread_plan, args.launcher,
                       on_start=lambda begun, folder: console.print(f"trials go to {echo(str(folder))}", highlight=False))
    paths = fit_report.write(done.result, done.folder)
    _show(done.result)
    console.print(f"fit: {echo(str(paths['markdown']))}  {echo(str(paths['csv']))}  {echo(str(paths['trials_csv']))}"
                  + (f"  {echo(str(paths['plot']))}" if "plot" in paths else ""), highlight=False)
    if done.failed:
        errors.print(f"[red]{len(done.failed)} search(es) not answered:[/] {echo('; '.join(done.failed))}", highlight=False)
        return Exit.FAILED
    return Exit.OK


def _show(result: dict[str, Any]) -> None:
    """The answers as a table narrow enough for a terminal (fit.md has every column)."""
    from qbench.analysis.report import fit as fit_report

    frame = fit_report.answers(result)
    quality = [c for c in frame.columns if c.endswith("(suite's settings)")]
    columns = {"arm": "arm", "axis": "axis", "largest that fits": "largest", "next tried (over)": "over",
               "peak at answer MiB": "peak MiB", "estimate error at answer %": "est. err %",
               "samples/s at answer": "samples/s", "tokens/s at answer": "tokens/s", "trials": "trials",
               **{c: c.removesuffix(" (suite's settings)") for c in quality}}
    table = Table(title=f"largest value within {sizes.label(result['budget_bytes'])} ({result['device']})")
    for title in columns.values():
        table.add_column(title, overflow="fold")
    for _, row in frame.iterrows():
        table.add_row(*(_cell(row[c]) for c in columns))
    console.print(table)
    for _, row in frame[frame["outcome"] != "found"].iterrows():
        console.print(f"{echo(row['arm'])} {echo(row['axis'])}: {echo(row['outcome'])}: {echo(str(row['note']))}", highlight=False)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1 else f"{value:,.1f}"
    return escape(str(value))
