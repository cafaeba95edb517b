"""The argument parser: one small function per command, each next to the handler it calls."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qbench import __version__
from qbench.cli import commands
from qbench.contract import precisions
from qbench.runner import executors

Commands = Any  # argparse's _SubParsersAction, which it does not name publicly

EXECUTOR_HELP = {
    "local": "this machine (the default): cells forked from a fork server that imported torch & co. once on a CPU, "
             "fresh interpreters on GPUs",
    "forkserver": "this machine, every cell forked from the run's fork server (CPU only)",
    "subprocess": "this machine, every cell a fresh interpreter",
    "ray": 'each cell a Ray task on a Ray cluster, its record written back into this run folder (pip install "qbench[ray]")',
    "slurm": "each cell a SLURM job through submitit, on a file system the nodes share; where there is no SLURM "
             '(no srun) each job runs on this machine in a process of its own (pip install "qbench[slurm]")',
}


def _add_run(commands_: Commands) -> None:
    run = commands_.add_parser(
        "run",
        help="run a suite: one process per cell of its grid (precision, seed, ...), one JSON record each",
        description="Run every cell of SUITE (a TOML file) and write records, results.csv and summary.md into "
        "OUT/<suite>/<run-id>/. Each cell runs in a process of its own, wherever --executor puts it (this machine, a "
        "Ray cluster, SLURM jobs); its record is the same wherever it ran and says where (env.executor, "
        "env.cell_launcher). Exit 0 when every cell is ok, 1 when a cell failed, 2 on a bad suite or an --out "
        "that cannot be written.",
    )
    run.add_argument("suite", nargs="?", help="suite file, e.g. suites/clip.toml")
    run.add_argument("--out", default="results", help="folder for run directories (default: results)")
    run.add_argument("--only", metavar="PRECISIONS", help="comma-separated subset of the matrix, e.g. bf16,nf4-dq")
    run.add_argument(
        "--where", action="append", default=[], metavar="AXIS=VALUES",
        help="keep only the cells whose AXIS has one of VALUES, e.g. optimizer=adamw8bit or batch_size=4,8; "
        "repeatable (every condition must hold); axes: precision, optimizer, lora_r, batch_size, max_length, "
        "gradient_checkpointing, seed",
    )
    run.add_argument("--seeds", metavar="SEEDS", help="comma-separated seeds overriding matrix.seeds, e.g. 0,1,2")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    run.add_argument(
        "--gpus",
        metavar="LIST",
        help="run cells in parallel, one process per GPU (CUDA_VISIBLE_DEVICES set per cell), e.g. 0,1,2,3; "
        "list a GPU twice to run two cells side by side on it",
    )
    run.add_argument(
        "--gpus-per-cell",
        type=float,
        default=1,
        metavar="N",
        help='give each cell N GPUs of --gpus, or N GPUs on Ray (for a base too large for one GPU; needs '
        'model.device_map = "auto"); on Ray a share such as 0.5 runs two cells per GPU',
    )
    run.add_argument(
        "--executor",
        choices=tuple(executors.REGISTRY),
        metavar="NAME",
        help="where and how cells run: " + "; ".join(f"{name}: {what}" for name, what in EXECUTOR_HELP.items()),
    )
    run.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: local (a cluster of this machine for this run; the default unless RAY_ADDRESS "
        "is set), auto (the cluster `ray start` joined this machine to), HOST:PORT (the head node) or "
        "ray://HOST:PORT (Ray Client)",
    )
    run.add_argument(
        "--cpus-per-cell",
        type=float,
        metavar="N",
        help="with --executor ray or slurm: CPUs each cell's task or job asks for (default 1; its torch threads "
        "default to them)",
    )
    run.add_argument("--slurm-partition", metavar="NAME", help="with --executor slurm: the partition its jobs go to")
    run.add_argument("--slurm-time-min", type=int, metavar="MIN",
                     help=f"with --executor slurm: each job's time limit in minutes (default {24 * 60})")
    run.add_argument(
        "--slurm-option", action="append", default=[], metavar="KEY=VALUE",
        help="with --executor slurm: any other sbatch setting submitit knows, e.g. account=myproject, qos=high, "
        "constraint=a100, mem=64G; repeatable",
    )
    run.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="run N cells side by side on this machine's CPU (threads per cell default to the cores divided by N); "
        "with --executor slurm: at most N jobs at once (default: one at a time on this machine, every cell at once on SLURM)",
    )
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per cell (overrides the suite's threads and OMP_NUM_THREADS; default: the cores, "
        "divided among cells run side by side)",
    )
    run.add_argument(
        "--launcher",
        choices=("auto", "forkserver", "subprocess"),
        default="auto",
        help="how this machine's cell processes start (the older spelling of --executor forkserver | subprocess): "
        "forked from a server that imported torch & co. and built the data once (auto on a CPU), or each a fresh "
        "interpreter (auto on GPUs)",
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="run only the I-th of N deterministic parts of the matrix (split a run over machines or CI jobs; "
        "load all the shards' run folders together to report them as one run)",
    )
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="finish a stopped run: run only the cells of RUN_DIR without an ok record, with the suite, cells, "
        "device and way of starting cells recorded in RUN_DIR/run.json; on this machine unless --executor ray or "
        "slurm says otherwise",
    )
    run.add_argument("--force", action="store_true", help="with --resume: resume even if the suite file changed since")
    run.add_argument(
        "--check", action="store_true",
        help="only check the suite, its data files, model, lengths and sizes against this machine (exit 0 or 2); "
        "run no cell and write nothing",
    )
    run.set_defaults(handler=commands.cmd_run)


def _add_env(commands_: Commands) -> None:
    env = commands_.add_parser(
        "env",
        help="versions, device, CUDA/driver, NVML, and which weight formats work here (each one tried)",
        description="Show versions, the device, CUDA and driver, NVML, and which weight formats work on DEVICE: each is "
        "tried (quantize, forward and backward a small layer) in a separate process.",
    )
    env.add_argument("--device", default="auto", help="where to try the formats: auto (default), cpu, cuda, cuda:N")
    env.add_argument("--compute-dtype", default="auto", choices=("auto", *precisions.DTYPE_NAMES),
                     help="the dtype the formats compute in (auto: what the device computes natively, as in a run)")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(handler=commands.cmd_env)


def _add_report(commands_: Commands) -> None:
    report = commands_.add_parser(
        "report",
        help="tables and plots from one or more run directories (CSV, Parquet, Markdown, HTML)",
        description="Merge the records of every RUN_DIR (run directories, folders of them, or exported CSV / "
        "Parquet tables: shards of one suite on several machines merge into one report) and write report.csv, "
        "report.parquet, summary.csv, report.md, plots/*.png and a self-contained report.html.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory, a folder of them, or a results CSV/Parquet")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report, NAME-report beside a table, or report-N-runs "
                        "beside the first of several inputs); an earlier report there is replaced, other files are not")
    report.add_argument("--title", help="page title (default: qbench report — SUITE)")
    report.set_defaults(handler=commands.cmd_report)


def _add_compare(commands_: Commands) -> None:
    comparing = commands_.add_parser(
        "compare",
        help="regression gate: NEW against BASELINE, exit 0 ok, 1 regression, 2 unusable input",
        description="Compare the records of NEW against BASELINE (run directories, folders of them, or exported "
        "CSV). Exact metrics must match, quality and memory may move the worse way by their tolerance (or the "
        "seeds' noise), speed is compared only as ratios to the baseline precision within one run, each by a rank test over "
        "its cells (not judged with fewer than five a side; `qbench gate` judges speed against the baseline's code run "
        "in the same job). Tolerances: "
        "--tolerance, then the suite's [compare.tolerances], then qbench's defaults. Writes a Markdown summary "
        "to --markdown and, when set, $GITHUB_STEP_SUMMARY. Exit 0: no regression; 1: regression; 2: unusable input.",
    )
    comparing.add_argument("baseline", metavar="BASELINE", help="baseline records, e.g. results/baselines/ci")
    comparing.add_argument("new", metavar="NEW", help="new records (run directory, folder of them, or CSV)")
    comparing.add_argument("--suite", help="take the [compare] settings from this suite file (default: the new run's suite)")
    comparing.add_argument("--tolerance", action="append", metavar="PATTERN=SPEC",
                           help="e.g. 'quality.*recall@1=abs:0.05' or 'ratio.*=rel:0.5' or 'memory.*=ignore'; repeatable")
    comparing.add_argument("--noise-sigmas", type=float, help="standard errors of seed noise allowed (default: suite, 3)")
    comparing.add_argument("--markdown", metavar="FILE", help="append the Markdown summary to FILE ('-': standard output)")
    comparing.set_defaults(handler=commands.cmd_compare)


def _add_gate(commands_: Commands) -> None:
    gating = commands_.add_parser(
        "gate",
        help="the CI regression gate in one job: SUITE run with the baseline's code and with this code in turns, judged",
        description="Run SUITE with the code of the commit the committed baseline measured (BASELINE/baseline.json, or "
        "--against; checked out in a temporary git worktree) and with this checkout's code, in turns (A B A B ...), "
        "then judge: exact figures, quality, memory and health against the committed records in BASELINE, speed "
        "(each step's time less its waits for a core) against the baseline's code run here, by a one-sided "
        "Mann-Whitney test per arm (docs/speed-gate.md). Exit 0: no regression; 1: regression; 2: unusable input.",
    )
    gating.add_argument("suite", help="suite file inside this repository, e.g. suites/ci.toml")
    gating.add_argument("--baseline", required=True, metavar="DIR", help="the committed baseline, e.g. results/baselines/ci")
    gating.add_argument("--against", metavar="COMMIT", help="run this commit's code as the baseline side (default: the "
                        "commit BASELINE/baseline.json names)")
    gating.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the cells run (default: cpu); "
                        "it also picks how speed is sampled (docs/speed-gate.md)")
    gating.add_argument("--processes", type=int, metavar="N", help="cell processes per arm and side (default by device: "
                        "8 on a CPU, 2 on a GPU)")
    gating.add_argument("--blocks", type=int, metavar="N", help="runs per side, in turns with the other side's (default 2)")
    gating.add_argument("--out", metavar="DIR", help="keep the runs here (default: a temporary folder, kept and named)")
    gating.add_argument("--markdown", metavar="FILE", help="append the Markdown verdict to FILE ('-': standard output)")
    gating.add_argument("--history", metavar="STORE", help="append this gate's figures to the history store STORE "
                        "(SQLite, made when missing), e.g. results/history/ci.sqlite")
    gating.set_defaults(handler=commands.cmd_gate)


def _add_history(commands_: Commands) -> None:
    showing = commands_.add_parser(
        "history",
        help="each figure of a history store over commits: a table, a plot, and the steps where it changed",
        description="Show the figures `qbench gate --history STORE` appended, one column per gate run (oldest first), "
        "flag step changes (a change point found by ruptures' PELT and larger than --min-change) and say which run and "
        "commit each step started at; draw them into --plot.",
    )
    showing.add_argument("store", metavar="STORE", help="the history store, e.g. results/history/ci.sqlite")
    showing.add_argument("--figure", action="append", metavar="PATTERN",
                         help="figures to show (fnmatch), e.g. 'speed.*'; repeatable (default: the main figures)")
    showing.add_argument("--last", type=int, metavar="N", help="only the last N gate runs")
    showing.add_argument("--plot", metavar="FILE", help="write the plot here (default: STORE with .png)")
    showing.add_argument("--min-change", type=float, default=0.05, metavar="FRACTION",
                         help="a step smaller than this share of the level before it is not flagged (default 0.05)")
    showing.set_defaults(handler=commands.cmd_history)


def _add_baseline(commands_: Commands) -> None:
    baselines = commands_.add_parser("baseline", help="manage committed baselines (results/baselines/<suite>/)")
    actions = baselines.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    refresh = actions.add_parser(
        "refresh",
        help="run SUITE and make its records the suite's committed baseline",
        description="Run every cell of SUITE (--repeats times) and, when every cell is ok, replace OUT/<suite>/ "
        "with the runs' records (<run-id>/run.json, cells/, results.csv, summary.md) and baseline.json (the commit "
        "measured). The cells run on this machine as `qbench run` runs them by default (the local executor: forked "
        "from a fork server on a CPU). Refuses a working tree with uncommitted changes unless --allow-dirty. OUT/<suite>/ is replaced "
        "only when it holds nothing but an earlier baseline of SUITE (checked before any cell). Review the diff and "
        "commit it.",
    )
    refresh.add_argument("suite", help="suite file, e.g. suites/ci.toml")
    refresh.add_argument("--out", default=str(Path("results") / "baselines"), help="baselines folder (default: results/baselines)")
    refresh.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    refresh.add_argument("--repeats", type=int, default=1, choices=range(1, 11), metavar="N",
                         help="run the suite N times (1-10): compare averages them and takes their spread as noise")
    refresh.add_argument("--allow-dirty", action="store_true",
                         help="make the baseline even from a working tree with uncommitted changes (its records say +dirty)")
    refresh.add_argument("--threads", type=int, metavar="N", help="torch threads per cell (default: the suite's, else as qbench run)")
    refresh.set_defaults(handler=commands.cmd_baseline_refresh)


def _add_list(commands_: Commands) -> None:
    listing = commands_.add_parser("list", help="show precisions, builtin models and builtin datasets")
    listing.set_defaults(handler=commands.cmd_list)


class Parser(argparse.ArgumentParser):
    """argparse, except that `--option=--` gives the option the text `--`: Python 3.11's argparse drops it and
    hands the option an empty list, which no command expects (it would end in a traceback, not one line)."""

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qbench",
        description="Run the same LoRA fine-tune under every base weight format (16-bit, LLM.int8, FP4, NF4, "
        "with and without double quantization) and compare memory, speed and quality.",
        epilog="Executors (qbench run --executor NAME): " + "; ".join(f"{name}: {what}" for name, what in EXECUTOR_HELP.items())
        + ". The same run as a library call: qbench.runner.api.run_suite(suite, executor=NAME).",
    )
    parser.add_argument("--version", action="version", version=f"qbench {__version__}")
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from qbench.cli import fit

    for add in (_add_run, fit.add_parser, _add_env, _add_report, _add_compare, _add_gate, _add_history, _add_baseline, _add_list):
        add(commands_)
    return parser
