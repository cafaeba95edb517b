"""The speed gate on real runs: loading the machine during a run does not fail `qbench compare`, a step that
really got slower (planted: each step does three times the CPU work) does.

Three runs of the builtin tiny CLIP with one thread per cell and five seeds (compare judges a ratio by a rank test
over its cells, which needs five a side): a baseline, the same run while busy loops
take every core, and a run whose nf4 cell is slowed by the `slow` test fault. What else runs moves a
cell's CPU time per step a little (shared caches, memory bandwidth) and its wall time a lot; the planted
slowdown (three times the work) is well beyond the first. With the busy loops the cells get a core less
than half the time they want one, and then even CPU time moves (caches go cold at every time slice):
compare judges no speed ratio of such a run, and says so. When other work
starves the baseline or the slowed run the same way, twice, the slowdown test is skipped: nothing
can be timed on the machine then.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis.gate import compare
from qbench.contract import records as results
from qbench.machine.threads import available_cores

from .conftest import write_suite
from .helpers import clip, executors, faults

pytestmark = pytest.mark.slow

SUITE = clip.suite(
    precisions=("dense", "nf4"), name="speedgate", settings="threads = 1", steps=14,
    train="batch_size = 16\nlr = 1e-3\nuntimed_steps = 2",
    lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]', evaluation="before = false",
    matrix="seeds = [0, 1, 2, 3, 4]", extra='[compare.tolerances]\n"ratio.speed.*" = { rel = 0.3 }\n',
)


SEEDS = 5  # cells a side per ratio: the fewest with which compare's rank test can reject at p < 0.01
SLOWER = ",".join(f"nf4-seed{seed}:train:slow:2.0" for seed in range(SEEDS))  # each nf4 step does three times the work


def _run(folder: Path, suite: Path, fault: str | None = None) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        if fault:  # the real pipeline with the fault planted (tests/helpers/faulty_cell.py)
            executors.use(patch, executors.FAULTY)
            patch.setenv(faults.ENV_VAR, fault)
        assert cli.main(["run", str(suite), "--out", str(folder), "--device", "cpu"]) == 0
    (run_dir,) = (folder / "speedgate").iterdir()
    return run_dir


def _starved(run_dir: Path) -> list[str]:
    return compare.starved_cells(pd.DataFrame(results.read_records(run_dir)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speedgate")
    suite = write_suite(root, SUITE)
    made = {"baseline": _run(root / "baseline", suite)}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(available_cores() + 1)]
    try:
        made["loaded"] = _run(root / "loaded", suite)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    made["slower"] = _run(root / "slower", suite, fault=SLOWER)
    if _starved(made["baseline"]) or _starved(made["slower"]):  # the machine was too busy to time anything: once more
        made["baseline"] = _run(root / "baseline-again", suite)
        made["slower"] = _run(root / "slower-again", suite, fault=SLOWER)
    return made


def test_a_run_on_a_loaded_machine_passes_the_gate(runs, capsys):
    loaded = results.read_records(runs["loaded"])
    assert any(r["speed.contended"] for r in loaded), [r["speed.contention"] for r in loaded]
    # wall time measured the load: its ratio is not judged (and with the cells starved of a core, no ratio is)
    assert cli.main(["compare", str(runs["baseline"]), str(runs["loaded"]), "--markdown", "-"]) == 0
    shown = capsys.readouterr().out
    assert "not judged" in shown and "ratio.speed.train_samples_per_cpu_s" in shown


def test_a_step_that_really_got_slower_fails_the_gate(runs, capsys):
    starved = _starved(runs["baseline"]) + _starved(runs["slower"])
    if starved:
        pytest.skip(f"this machine was too busy to time anything, twice (cells had a core less than half the time they "
                    f"wanted one: {', '.join(starved)}); compare rightly judges no speed ratio of such runs")
    slowed = {r["precision"]: r for r in results.read_records(runs["slower"])}
    assert "slow" in slowed["nf4"]["test.injected_faults"]
    assert cli.main(["compare", str(runs["baseline"]), str(runs["slower"]), "--markdown", "-"]) == 1
    verdict = capsys.readouterr().out.split("<details>")[0]
    assert "nf4" in verdict and "ratio.speed.train_samples_per_cpu_s" in verdict
