"""The regression gate as one job: the suite run with the baseline's code and with this code in turns, judged.

    from qbench.runner.gate import run_gate
    result = run_gate("suites/ci.toml", baseline="results/baselines/ci")
    result.comparison.exit_code, result.runs, result.seconds

Speed cannot be compared with figures measured on another machine or at another moment, so the baseline's
code runs again here: the commit the committed baseline measured (its baseline.json) is checked out in a
temporary git worktree, and its runs alternate with this code's (A B A B ...) so that both sides see the same
machine. The committed records still judge everything that does not move with the machine: exact figures,
quality, memory (qbench.analysis.gate.same_job).

The baseline side runs exactly the baseline commit: its PYTHONPATH is its checkout alone. Whatever this job's
environment adds to Python's path (a sitecustomize, a wrapper) reaches only the new side, as this job's code
does: it is part of what is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qbench.contract.suite import SuiteError, load
from qbench.runner.plan import COMMAND_LINE

if TYPE_CHECKING:
    from qbench.analysis.gate.compare import Comparison
    from qbench.analysis.gate.speed import SpeedPolicy

BASELINE_SIDE = "baseline"
NEW_SIDE = "new"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class GateError(RuntimeError):
    """The gate cannot run: no git checkout to take the baseline's code from, or its commit is not here."""


@dataclass(frozen=True)
class Side:
    """One side of the gate: a name, the qbench checkout whose code it runs, its environment."""

    name: str
    root: Path
    env: dict[str, str]


@dataclass(frozen=True)
class Block:
    """One run of one side: which side, which turn, its run folder (None: the run wrote none), its exit code,
    wall seconds, and the log of its `qbench run` (what it printed)."""

    side: str
    turn: int
    run_dir: Path | None
    exit_code: int
    seconds: float
    log: Path | None = None


@dataclass
class GateRuns:
    """Every side's runs, in the order they ran."""

    blocks: list[Block] = field(default_factory=list)

    def run_dirs(self, side: str) -> list[Path]:
        return [b.run_dir for b in self.blocks if b.side == side and b.run_dir is not None]

    def seconds(self, side: str) -> float:
        return sum(b.seconds for b in self.blocks if b.side == side)


def baseline_commit(baseline_dir: Path) -> str | None:
    """The commit the committed baseline measured (its baseline.json), or None when it does not say."""
    manifest = Path(baseline_dir) / "baseline.json"
    try:
        commit = json.loads(manifest.read_text(encoding="utf-8")).get("commit")
    except (OSError, ValueError, AttributeError):
        return None
    return commit if isinstance(commit, str) and commit and not commit.endswith("+dirty") else None


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise GateError(f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return done.stdout.strip()


def resolve_commit(repo: Path, commit: str) -> str:
    """The full hash of `commit` (a hash, HEAD, a branch) in the git checkout `repo`; GateError when it is not
    a checkout or the commit is not in it (a shallow clone: fetch it)."""
    if shutil.which("git") is None:
        raise GateError("git is not installed: the gate takes the baseline's code from its commit")
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except GateError:
        raise GateError(f"commit {commit} is not in the git checkout {repo}: the gate runs the baseline's code from it "
                        f"(in a shallow clone: git fetch --unshallow, or git fetch origin {commit})") from None


@contextmanager
def checkout(repo: Path, commit: str) -> Iterator[Path]:
    """A temporary git worktree of `commit` (detached), removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="qbench-gate-"))
    tree = scratch / commit[:12]
    _git(repo, "worktree", "add", "--detach", "--quiet", str(tree), commit)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True, timeout=120)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, timeout=120)
        shutil.rmtree(scratch, ignore_errors=True)


def side_env(root: Path, inherit_path: bool) -> dict[str, str]:
    """The environment of a side's runs: this one's, with `root` first on Python's path; the rest of
    PYTHONPATH only when `inherit_path` (the new side)."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH") if inherit_path else None
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), rest]))
    return env


def _new_run_dir(out: Path) -> Path | None:
    """The one run folder `qbench run --out out` made (out/<suite>/<run-id>), or None."""
    found = [p for p in out.glob("*/*") if (p / "run.json").is_file()]
    return found[0] if len(found) == 1 else None


def run_block(side: Side, suite: str, out: Path, seeds: list[int], device: str, turn: int = 0,
              timeout_s: float | None = None) -> Block:
    """One `qbench run` of `suite` (a path relative to the side's checkout) by the side's code, into `out`; what
    it prints goes to `out`.log."""
    command = [sys.executable, "-m", "qbench", "run", str(side.root / suite), "--out", str(out), "--device", device,
               "--seeds", ",".join(map(str, seeds))]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        try:
            code = subprocess.run(command, cwd=side.root, env={**side.env, "COLUMNS": "120"}, stdin=subprocess.DEVNULL,
                                  stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return Block(side.name, turn, _new_run_dir(out), code, time.perf_counter() - started, log)


def run_sides(sides: list[Side], suite: str, out: Path, device: str, blocks: int, seeds_per_block: int,
              on_block: Callable[[Block, int, int], None] = lambda block, done, total: None) -> GateRuns:
    """Every side's `blocks` runs in turns (A B A B ...), each running the suite's arms with seeds
    0..seeds_per_block-1, into out/<side>/<turn>."""
    runs = GateRuns()
    total = blocks * len(sides)
    seeds = list(range(seeds_per_block))
    for turn in range(blocks):
        for side in sides:
            block = run_block(side, suite, out / side.name / str(turn), seeds, device, turn)
            runs.blocks.append(block)
            on_block(block, len(runs.blocks), total)
    return runs


def suite_in_repo(suite: str | Path, repo: Path) -> str:
    """`suite` as a path inside the checkout `repo` (each side runs its own copy of it); SuiteError when it is
    not inside it."""
    path = Path(suite).resolve()
    try:
        return str(path.relative_to(repo.resolve()))
    except ValueError:
        raise SuiteError(COMMAND_LINE, [f"{suite}: the gate runs the suite file of each side's checkout, so it must be "
                                        f"inside the repository {repo}"]) from None


def repo_root(start: Path = PACKAGE_ROOT) -> Path:
    """The git checkout holding this qbench; GateError when there is none."""
    if shutil.which("git") is None:
        raise GateError("git is not installed: the gate takes the baseline's code from its commit")
    try:
        return Path(_git(start, "rev-parse", "--show-toplevel"))
    except GateError:
        raise GateError(f"{start} is not in a git checkout: the gate takes the baseline's code from its commit") from None


@dataclass
class GateResult:
    """What the gate ran and judged: its runs, the baseline commit, the verdict, its wall seconds."""

    runs: GateRuns
    commit: str
    comparison: Comparison
    seconds: float
    device: str
    policy: SpeedPolicy


def run_gate(suite: str | Path, baseline: str | Path, *, against: str | None = None, out: str | Path | None = None,
             device: str = "cpu", processes: int | None = None, blocks: int | None = None,
             on_block: Callable[[Block, int, int], None] = lambda block, done, total: None) -> GateResult:
    """Run `suite` with the baseline's code (`against`, else the commit of the committed baseline in `baseline`)
    and with this code in turns, then judge: exact, quality and memory against the committed records, speed
    against the baseline side. SuiteError / GateError before any run when the input cannot be used."""
    from qbench.analysis.gate import same_job, speed
    from qbench.contract import records

    started = time.perf_counter()
    loaded = load(suite)  # a bad suite: one line, before anything runs
    repo = repo_root()
    relative = suite_in_repo(loaded.path, repo)
    baseline = Path(baseline)
    if not baseline.is_dir() or not records.find_run_dirs(baseline):
        raise SuiteError(COMMAND_LINE, [f"--baseline {baseline}: no baseline runs there (make one with qbench baseline refresh)"])
    commit = against or baseline_commit(baseline)
    if commit is None:
        raise GateError(f"{baseline}/baseline.json names no clean commit: pass --against COMMIT, or refresh the baseline "
                        "from a clean checkout")
    commit = resolve_commit(repo, commit)
    policy = speed.policy_for(device, processes, blocks)
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise SuiteError(COMMAND_LINE, [f"--out {out}: not an empty folder; the gate's runs need one of their own"])
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="qbench-gate-runs-"))
    with checkout(repo, commit) as tree:
        sides = [Side(speed_side, root, side_env(root, inherit_path=speed_side == NEW_SIDE))
                 for speed_side, root in ((BASELINE_SIDE, tree), (NEW_SIDE, repo))]
        runs = run_sides(sides, relative, out_dir, device, policy.blocks, policy.seeds_per_block, on_block)
    comparison = same_job.judge(baseline, runs.run_dirs(BASELINE_SIDE), runs.run_dirs(NEW_SIDE), policy,
                                baseline_label=f"{baseline} (commit {commit[:12]} re-run here)", new_label="this checkout")
    return GateResult(runs, commit, comparison, time.perf_counter() - started, device, policy)
