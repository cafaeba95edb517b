"""Developer check of `qbench fit`: the value it finds fits the budget as an ordinary `qbench run` cell, and the next
larger value does not; the answers of dense and nf4-dq differ; every trial's estimate is within 15 % of its measurement.

    python scripts/fit_check.py suites/fit-llm.toml suites/fit-clip.toml --repeats 3 --out /tmp/fit-check
    python scripts/fit_check.py suites/fit-llm.toml --fit-args="--device cuda --budget 256MiB --axis batch_size" \
        --run-args="--device cuda" --error-limit 1 --any-answers        # on a GPU (scripts/gpu_check.sh)

For each suite and repeat: `qbench fit SUITE` (its own budget), then, per arm, `qbench run` of the suite with the
searched axis listed in the matrix at the found value and the one above, and the records' `fit.within_budget`
read back. Prints one line per check and a summary of the peaks over the repeats; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

ERROR_LIMIT = 0.15


def qbench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "qbench", *args], capture_output=True, text=True, env=env)


def newest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime)


def run_cells(suite: Path, axis: str, precision: str, values: list[int], out: Path, run_args: list[str],
              budget: int, margin: float) -> dict[int, dict]:
    """The records of `qbench run` of the suite at `values` of `axis` for one precision, judged against the
    budget and margin the fit used (qbench fit --budget may have overridden the suite's)."""
    raw = tomllib.loads(suite.read_text())
    raw.setdefault("matrix", {})[axis] = values
    raw["fit"] = {**raw.get("fit", {}), "budget": budget, "margin": margin}
    check = out / f"{suite.stem}-{precision}-{axis}.toml"
    check.write_text(tomli_w.dumps(raw))
    # data and model paths of a builtin suite do not depend on the suite's folder
    done = qbench("run", str(check), "--out", str(out / "runs"), "--only", precision, *run_args)
    if done.returncode not in (0, 1):
        raise SystemExit(f"qbench run {check} failed ({done.returncode}): {done.stderr[-2000:]}")
    run_dir = newest(out / "runs" / raw["name"], "2*")
    records = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    return {r[f"config.train.{axis}"]: r for r in records}



def check_suite(suite: Path, out: Path, repeat: int, args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    failures, rows = [], []
    done = qbench("fit", str(suite), "--out", str(out / "fits"), "--no-quality", *args.fit_args.split())
    if done.returncode != 0:
        return [f"{suite}: qbench fit exited {done.returncode}: {done.stderr[-2000:]}"], rows
    name = tomllib.loads(suite.read_text())["name"]
    result = json.loads((newest(out / "fits" / name, "fit-*") / "fit.json").read_text())
    answers = {}
    for search in result["searches"]:
        arm, axis, found = search["arm"], search["axis"], search["largest"]
        for trial in search["trials"]:
            rows.append({"suite": name, "repeat": repeat, "arm": arm, "axis": axis, "value": trial["value"],
                         "estimate": trial["estimate"]["peak"], "measured": trial["measured"], "error": trial["error"]})
            if trial["measured"] is not None and (trial["error"] is None or abs(trial["error"]) > args.error_limit):
                failures.append(f"{name} {arm} {axis}={trial['value']}: estimate error {trial['error']}")
        if len(search["trials"]) > search["max_trials"]:
            failures.append(f"{name} {arm}: {len(search['trials'])} trials, more than {search['max_trials']}")
        if search["outcome"] != "found":
            failures.append(f"{name} {arm}: outcome {search['outcome']} ({search['reason']})")
            continue
        answers[arm] = found
        records = run_cells(suite, axis, search["precision"], [found, found + 1], out, args.run_args.split(),
                            result["budget_bytes"], result["margin"])
        for value, expected in ((found, True), (found + 1, False)):
            record = records.get(value, {})
            verdict = record.get("fit.within_budget")
            line = (f"{name} repeat {repeat} {arm} {axis}={value}: qbench run peak {record.get('fit.peak_bytes')} bytes, "
                    f"limit {record.get('fit.limit_bytes')}, within budget: {verdict} (expected {expected})")
            print(line, flush=True)
            if verdict is not expected:
                failures.append(line)
    if not args.any_answers and "dense" in answers and "nf4-dq" in answers and answers["dense"] == answers["nf4-dq"]:
        failures.append(f"{name}: dense and nf4-dq found the same value ({answers['dense']})")
    print(f"{name} repeat {repeat}: answers {answers}", flush=True)
    return failures, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results") / "fit-check")
    parser.add_argument("--fit-args", default="", help="more arguments for qbench fit, e.g. '--device cuda --budget 1GiB'")
    parser.add_argument("--run-args", default="", help="more arguments for qbench run, e.g. '--device cuda'")
    parser.add_argument("--error-limit", type=float, default=ERROR_LIMIT,
                        help="largest |estimate - measured| / measured accepted (default 0.15)")
    parser.add_argument("--any-answers", action="store_true", help="do not require dense and nf4-dq to differ")
    args = parser.parse_args()
    failures, rows = [], []
    for repeat in range(1, args.repeats + 1):
        for suite in args.suites:
            found, measured = check_suite(suite, args.out, repeat, args)
            failures += found
            rows += measured
    (args.out / "trials.json").write_text(json.dumps(rows, indent=1))
    spread: dict[tuple, list[int]] = {}
    for row in rows:
        spread.setdefault((row["suite"], row["arm"], row["axis"], row["value"]), []).append(row["measured"])
    for (suite, arm, axis, value), peaks in sorted(spread.items()):
        print(f"{suite} {arm} {axis}={value}: measured over {len(peaks)} trial(s): min {min(peaks)}, max {max(peaks)}, "
              f"spread {max(peaks) - min(peaks)} bytes")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
