"""Refreshing a committed baseline: the records of a clean run replace the old ones, a failed run changes nothing."""

import json
from pathlib import Path

import pytest

from qbench import cli
from qbench.gate import baseline

from .records import make_record, make_records, write_run


def test_a_clean_run_replaces_the_baseline_records_without_logs(tmp_path: Path):
    run = write_run(tmp_path / "run", make_records(run_id="new"), suite_text='name = "ci"\n')
    (run / "logs").mkdir()
    (run / "logs" / "bf16-seed0.log").write_text("noise")
    again = write_run(tmp_path / "again", make_records(run_id="again"), suite_text='name = "ci"\n')
    old = write_run(tmp_path / "baselines" / "ci" / "old", make_records(precisions=("bf16",), run_id="old"))
    target = baseline.install([run, again], tmp_path / "baselines", "ci")
    assert target == old.parent
    assert sorted(p.name for p in target.iterdir()) == ["again", "run"]  # the old run is gone
    assert sorted(p.name for p in (target / "run" / "cells").iterdir()) == ["bf16-seed0.json", "int8-seed0.json", "nf4-dq-seed0.json"]
    assert json.loads((target / "run" / "cells" / "bf16-seed0.json").read_text())["run_id"] == "new"
    assert (target / "run" / "run.json").is_file() and not (target / "run" / "logs").exists()
    assert cli.main(["compare", str(target), str(run)]) == 0


def test_a_run_with_a_failed_cell_leaves_the_baseline_as_it_was(tmp_path: Path):
    records = make_records(run_id="new")
    records[1] = make_record("int8", run_id="new", status="failed", error="boom")
    run = write_run(tmp_path / "run", records)
    fine = write_run(tmp_path / "fine", make_records(run_id="fine"))
    old = write_run(tmp_path / "baselines" / "ci" / "old", make_records(run_id="old"))
    with pytest.raises(baseline.BaselineError, match="int8-seed0 \\(failed\\)"):
        baseline.install([fine, run], tmp_path / "baselines", "ci")
    assert {json.loads(p.read_text())["run_id"] for p in (old / "cells").iterdir()} == {"old"}
    assert [p.name for p in (tmp_path / "baselines").iterdir()] == ["ci"]  # no staging folder left behind
