"""The report and the regression gate on a real two-cell run of the builtin tiny CLIP."""

import json
import shutil
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import precisions

from .conftest import write_suite
from .helpers import clip

SMALL = clip.suite(
    precisions=("bf16", "nf4-dq"), name="gate-e2e", steps=3, train="batch_size = 16\nlr = 1e-3\nmax_length = 16\nuntimed_steps = 1",
    lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]', evaluation="before = false",
)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real run, made the way a committed baseline is: `qbench baseline refresh`."""
    folder = tmp_path_factory.mktemp("gate")
    suite = write_suite(folder, SMALL)
    # --allow-dirty: the tests run in working trees with changes; the refusal itself is tested in test_baseline.py
    assert cli.main(["baseline", "refresh", str(suite), "--out", str(folder / "baselines"), "--device", "cpu", "--allow-dirty"]) == 0
    (run_dir,) = (p for p in (folder / "baselines" / "gate-e2e").iterdir() if p.is_dir())
    assert (folder / "baselines" / "gate-e2e" / "baseline.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["cells", "results.csv", "run.json", "summary.md"]
    return run_dir


def test_report_of_a_real_run_embeds_every_plot(real_run: Path):
    assert cli.main(["report", str(real_run)]) == 0
    html = (real_run / "report" / "report.html").read_text()
    drawn = sorted(p.stem for p in (real_run / "report" / "plots").glob("*.png"))
    # no before/after plot: the suite evaluates after fine-tuning only
    assert len(drawn) == 5 and not any("before" in name for name in drawn), drawn
    assert html.count("data:image/png;base64,") == len(drawn)
    assert "Relative to bf16" in html


def test_a_real_run_passes_against_itself_and_fails_with_planted_regressions(real_run: Path, tmp_path: Path):
    assert cli.main(["compare", str(real_run), str(real_run)]) == 0
    planted = tmp_path / "planted"
    shutil.copytree(real_run, planted, ignore=shutil.ignore_patterns("report", "logs"))
    record_file = planted / "cells" / "nf4-dq-seed0.json"
    record = json.loads(record_file.read_text())
    record["weights.base_bytes"] += precisions.BNB_4BIT_BLOCKSIZE * 4 // 8
    record["quality.after.t2i_recall@1"] -= 0.05
    record_file.write_text(json.dumps(record))
    summary = tmp_path / "summary.md"
    assert cli.main(["compare", str(real_run), str(planted), "--markdown", str(summary)]) == 1
    text = summary.read_text()
    assert "weights.base_bytes" in text.split("<details>")[0]
    assert "quality.after.t2i_recall@1" in text.split("<details>")[0]
