"""The speed gate's false-alarm and miss rates, measured: repeated gate runs on unchanged code and on code whose
training step is made slower from outside.

    python benchmarks/speed_gate_trials.py                  # 20 trials of suites/ci.toml on this machine
    python benchmarks/speed_gate_trials.py --trials 5 --out /tmp/trials
    python benchmarks/speed_gate_trials.py --summary /tmp/trials/trials.jsonl   # the rates of trials already run
    python benchmarks/speed_gate_trials.py --spread /tmp/trials   # per-process spread of each step-time figure

Each trial is one job of the gate (qbench.runner.gate) with four sides in turns (A B C D A B C D): the baseline
side (the `--against` commit, HEAD by default, in a temporary git worktree, as `qbench gate` runs it), and three
new sides running this checkout's code — unchanged; with every optimizer step made `--slower` (30 %) slower in
every arm; and the same in the 4-bit arms only (nf4-dq in the CI suite). Each new side is judged against the
baseline side exactly as `qbench gate` judges (qbench.analysis.gate.same_job.judge, with the committed baseline
`--baseline` for everything but speed). The slowdown is planted from outside qbench: a sitecustomize.py on the
slowed sides' PYTHONPATH registers a global optimizer-step hook (torch.optim.optimizer.
register_optimizer_step_post_hook) that spins for `--slower` times the time since the previous step ended.

A false alarm is an unchanged side that fails the gate; a miss is a slowed side that passes it. The gate's
duration of a trial is what `qbench gate` would take for one new side: the baseline side's runs plus that
side's. Every trial's outcome is appended to OUT/trials.jsonl as it finishes; the load average is read before
every run. One trial runs at a time (it keeps a core busy); prefix it with `nice` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLANT = '''"""Planted by benchmarks/speed_gate_trials.py: every optimizer step QBENCH_TRIAL_SLOWER slower (a spin, or a sleep),
in every arm or, with QBENCH_TRIAL_ONLY=4bit, only in processes whose model runs bitsandbytes' Linear4bit."""
import importlib.abc
import os
import sys
import time

SLOWER = float(os.environ.get("QBENCH_TRIAL_SLOWER", "0"))
ONLY_4BIT = os.environ.get("QBENCH_TRIAL_ONLY") == "4bit"
SLEEP = os.environ.get("QBENCH_TRIAL_PLANT") == "sleep"  # wait instead of computing: no CPU time spent
_state = {"last": None, "4bit": False}


def _after_step(optimizer, args, kwargs):
    now = time.perf_counter()
    if _state["last"] is not None and (_state["4bit"] or not ONLY_4BIT):
        wait = SLOWER * (now - _state["last"])  # the step's own time since the previous step ended
        if SLEEP:
            time.sleep(wait)
        end = now + wait
        while time.perf_counter() < end:
            pass
    _state["last"] = time.perf_counter()


def _hook_optimizers(module):
    module.register_optimizer_step_post_hook(_after_step)


def _mark_4bit(module):
    forward = module.Linear4bit.forward

    def marked(self, *args, **kwargs):
        _state["4bit"] = True
        return forward(self, *args, **kwargs)

    module.Linear4bit.forward = marked


AFTER_IMPORT = {"torch.optim.optimizer": _hook_optimizers, "bitsandbytes.nn.modules": _mark_4bit}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs AFTER_IMPORT[name] once the module `name` is imported (nothing is imported here before)."""

    def find_spec(self, name, path, target=None):
        if name not in AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run, name=name):
                    run(module)
                    AFTER_IMPORT[name](module)

                spec.loader.exec_module = exec_module
                return spec
        return None


if SLOWER > 0:
    sys.meta_path.insert(0, _AfterImport())
'''

KINDS = {  # side name -> (what it plants, the outcome the gate should give)
    "unchanged": ({}, "pass"),
    "slower-all": ({"QBENCH_TRIAL_ONLY": "all"}, "fail"),
    "slower-4bit": ({"QBENCH_TRIAL_ONLY": "4bit"}, "fail"),
}


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def sides(tree: Path, plant_dir: Path, slower: float, kinds: list[str], plant: str = "spin") -> list:
    from qbench.runner import gate

    made = [gate.Side(gate.BASELINE_SIDE, tree, gate.side_env(tree, inherit_path=False))]
    for kind in kinds:
        env = gate.side_env(ROOT, inherit_path=True)
        planted, _ = KINDS[kind]
        if planted:
            env["PYTHONPATH"] = os.pathsep.join([str(plant_dir), env["PYTHONPATH"]])
            env.update(planted, QBENCH_TRIAL_SLOWER=str(slower), QBENCH_TRIAL_PLANT=plant)
        made.append(gate.Side(kind, ROOT, env))
    return made


def trial(number: int, args: argparse.Namespace, tree: Path, plant_dir: Path, out: Path) -> list[dict]:
    """One trial: every side's runs in turns, then each new side judged against the baseline side."""
    from qbench.analysis.gate import same_job, speed
    from qbench.runner import gate

    policy = speed.policy_for(args.device, args.processes, args.blocks)
    loads: list[float] = []

    def seen(block, done, total):
        loads.append(load_average() or float("nan"))
        print(f"  trial {number}: {block.side} run {block.turn + 1} {block.seconds:.0f} s (exit {block.exit_code})", flush=True)

    relative = gate.suite_in_repo(ROOT / args.suite, ROOT)
    runs = gate.run_sides(sides(tree, plant_dir, args.slower, args.kinds, args.plant), relative, out / f"trial-{number}", args.device,
                          policy.blocks, policy.seeds_per_block, seen)
    outcomes = []
    for kind in args.kinds:
        started = time.perf_counter()
        verdict = same_job.judge(ROOT / args.baseline, runs.run_dirs(gate.BASELINE_SIDE), runs.run_dirs(kind), policy)
        judged_s = time.perf_counter() - started
        failing = verdict.regressions
        expected = KINDS[kind][1]
        passed = verdict.exit_code == 0
        speed_rows = verdict.checks[verdict.checks["kind"] == "speed"] if not verdict.checks.empty else verdict.checks
        outcomes.append({
            "trial": number, "side": kind, "expected": expected, "exit_code": int(verdict.exit_code),
            "right": passed if expected == "pass" else verdict.exit_code == 1,
            "failing": [f"{r['arm']} {r['metric']} {r['verdict']}" for _, r in failing.iterrows()],
            "problems": verdict.problems,
            "speed": {str(r["arm"]): {"ratio": r.get("ratio"), "p": r.get("p_value"), "verdict": r["verdict"],
                                      "samples": f"{r.get('n_baseline')}/{r.get('n_new')}"} for _, r in speed_rows.iterrows()},
            "gate_s": runs.seconds(gate.BASELINE_SIDE) + runs.seconds(kind) + judged_s,
            "load_min": min(loads), "load_max": max(loads), "policy": policy.describe(),
        })
    return outcomes


def summary(rows: list[dict]) -> str:
    """The rates per side kind, the gate's duration and the load during the trials."""
    lines = []
    for kind, (_, expected) in KINDS.items():
        mine = [r for r in rows if r["side"] == kind]
        if not mine:
            continue
        wrong = sum(not r["right"] for r in mine)
        what = "false alarms" if expected == "pass" else "misses"
        lines.append(f"{kind:12s} {what}: {wrong}/{len(mine)}  (the gate should {expected})")
    durations = [r["gate_s"] for r in rows]
    loads = [r["load_min"] for r in rows] + [r["load_max"] for r in rows]
    if durations:
        lines.append(f"gate duration (baseline side + one new side + judgement): median {statistics.median(durations):.0f} s, "
                     f"max {max(durations):.0f} s")
    if loads:
        lines.append(f"load average (1 min) read before each run: {min(loads):.1f} to {max(loads):.1f}")
    if rows:
        lines.append(f"policy: {rows[0]['policy']}")
    return "\n".join(lines)


SPREAD_FIGURES = {"wall": "speed.step_time_p50_s", "cpu": "speed.step_cpu_time_p50_s", "unqueued": "speed.step_unqueued_time_p50_s"}


def spread(out: Path) -> str:
    """What the trials' unchanged cells say of each per-process step-time figure (wall, CPU, unqueued): its spread
    over processes per arm, and how often a rank test at p < 0.01 calls the same code slower when each process's
    median is a sample (the gate on a CPU) and when every timed step is one (the gate on a GPU)."""
    from scipy.stats import mannwhitneyu

    from qbench.analysis import load

    lines = []
    frames = {}
    for trial_dir in sorted(out.glob("trial-*")):
        for side in ("baseline", "unchanged"):
            runs = sorted(trial_dir.glob(f"{side}/*/*/*"))
            if runs:
                frame = load.load_results(runs)
                frames[(trial_dir.name, side)] = frame[frame["status"] == "ok"]
    if not frames:
        return f"{out}: no trial runs"
    both = list(frames.values())
    import pandas as pd

    every = pd.concat(both, ignore_index=True)
    for arm, cells in every.groupby("precision"):
        parts = []
        for name, column in SPREAD_FIGURES.items():
            values = pd.to_numeric(cells[column], errors="coerce").dropna()
            parts.append(f"{name} {1e3 * values.median():.1f} ms, spread (sd/mean) {values.std() / values.mean():.1%}, "
                         f"{1e3 * values.min():.1f}-{1e3 * values.max():.1f}")
        lines.append(f"{arm} ({len(cells)} processes): " + "; ".join(parts))
    alarms = {"process": 0, "step": 0}
    tests = 0
    for trial in sorted({t for t, _ in frames}):
        if (trial, "baseline") not in frames or (trial, "unchanged") not in frames:
            continue
        a, b = frames[(trial, "baseline")], frames[(trial, "unchanged")]
        for arm in sorted(set(a["precision"])):
            x, y = a[a["precision"] == arm], b[b["precision"] == arm]
            tests += 1
            per_process = mannwhitneyu(y[SPREAD_FIGURES["unqueued"]], x[SPREAD_FIGURES["unqueued"]], alternative="greater").pvalue
            steps_x = [v for steps in x["speed.step_unqueued_times_s"] for v in steps]
            steps_y = [v for steps in y["speed.step_unqueued_times_s"] for v in steps]
            per_step = mannwhitneyu(steps_y, steps_x, alternative="greater").pvalue
            alarms["process"] += per_process < 0.01
            alarms["step"] += per_step < 0.01
    if tests:
        lines.append(f"same code, p < 0.01 (one-sided, unqueued time) in {tests} arm comparisons: {alarms['process']} with each "
                     f"process's median as a sample, {alarms['step']} with every timed step as a sample")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials (default 20)")
    parser.add_argument("--suite", default="suites/ci.toml", help="suite file inside this repository (default suites/ci.toml)")
    parser.add_argument("--baseline", default="results/baselines/ci", help="committed baseline (default results/baselines/ci)")
    parser.add_argument("--against", default="HEAD", help="the baseline side's commit (default HEAD: the same code as the "
                        "unchanged side)")
    parser.add_argument("--slower", type=float, default=0.30, help="how much slower a planted step is (default 0.30)")
    parser.add_argument("--plant", default="spin", choices=("spin", "sleep"), help="how a planted step is slower: it "
                        "computes (spin, the default) or waits (sleep)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"sides to run, of {', '.join(KINDS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--processes", type=int, help="cell processes per arm and side (default: the gate's for the device)")
    parser.add_argument("--blocks", type=int, help="runs per side (default: the gate's for the device)")
    parser.add_argument("--out", help="folder for the runs and trials.jsonl (default: a temporary folder)")
    parser.add_argument("--summary", metavar="JSONL", help="print the rates of the trials in JSONL and stop")
    parser.add_argument("--spread", metavar="OUT", help="print the per-process spread of the step-time figures in the "
                        "unchanged runs of the trials in OUT, and stop")
    args = parser.parse_args(argv)
    if args.spread:
        print(spread(Path(args.spread)))
        return 0
    if args.summary:
        print(summary([json.loads(line) for line in Path(args.summary).read_text().splitlines() if line.strip()]))
        return 0
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)} (of {', '.join(KINDS)})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from qbench.runner import gate

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qbench-gate-trials-"))
    out.mkdir(parents=True, exist_ok=True)
    plant_dir = out / "plant"
    plant_dir.mkdir(exist_ok=True)
    (plant_dir / "sitecustomize.py").write_text(PLANT, encoding="utf-8")
    log = out / "trials.jsonl"
    repo = gate.repo_root(ROOT)
    commit = gate.resolve_commit(repo, args.against)
    print(f"{args.trials} trials of {args.suite} against {commit[:12]}; runs and {log.name} in {out}", flush=True)
    rows: list[dict] = []
    with gate.checkout(repo, commit) as tree:
        for number in range(1, args.trials + 1):
            for outcome in trial(number, args, tree, plant_dir, out):
                rows.append(outcome)
                with log.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(outcome, default=str) + "\n")
                shown = ", ".join(f"{arm} x{s['ratio']:.3f} p={s['p']:.2g}" for arm, s in outcome["speed"].items()
                                  if isinstance(s["ratio"], float) and isinstance(s["p"], float))
                print(f"trial {number} {outcome['side']}: exit {outcome['exit_code']} "
                      f"({'right' if outcome['right'] else 'WRONG'}; gate {outcome['gate_s']:.0f} s) {shown}", flush=True)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
