"""Refreshing a committed baseline: the records of a clean run replace the old ones, a failed run changes nothing."""

import json
from pathlib import Path

import pytest

from qbench import cli
from qbench.analysis.gate import baseline
from qbench.contract import files

from .records import make_record, make_records, write_run


def test_a_clean_run_replaces_the_baseline_records_without_logs(tmp_path: Path):
    run = write_run(tmp_path / "run", make_records(run_id="new"), suite_text='name = "ci"\n')
    (run / "logs").mkdir()
    (run / "logs" / "bf16-seed0.log").write_text("noise")
    again = write_run(tmp_path / "again", make_records(run_id="again"), suite_text='name = "ci"\n')
    old = write_run(tmp_path / "baselines" / "ci" / "old", make_records(precisions=("bf16",), run_id="old"))
    files.mark_owned(old.parent, "qbench baseline refresh")  # as an earlier refresh leaves it
    target = baseline.install([run, again], tmp_path / "baselines", "ci")
    assert target == old.parent
    assert sorted(p.name for p in target.iterdir()) == [files.OWNED_MARKER, "again", "baseline.json", "run"]  # the old run is gone
    assert files.ownership_problem(target) is None  # and the next refresh may replace this one
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


def test_a_baseline_refuses_a_dirty_tree_unless_told_and_records_its_commit(tmp_path: Path):
    dirty = write_run(tmp_path / "dirty", [make_record(p, run_id="dirty", env__git_commit="abc+dirty") for p in ("bf16", "int8")])
    with pytest.raises(baseline.BaselineError, match="uncommitted changes \\(abc\\+dirty\\)"):
        baseline.install([dirty], tmp_path / "baselines", "ci")
    assert not (tmp_path / "baselines" / "ci").exists()
    target = baseline.install([dirty], tmp_path / "baselines", "ci", allow_dirty=True)
    assert json.loads((target / "baseline.json").read_text())["clean"] is False
    clean = write_run(tmp_path / "clean", make_records(run_id="clean"))  # env.git_commit "abc"
    target = baseline.install([clean], tmp_path / "baselines", "ci")
    manifest = json.loads((target / "baseline.json").read_text())
    assert manifest["commit"] == "abc" and manifest["clean"] is True and manifest["runs"] == ["clean"]
    assert cli.main(["compare", str(target), str(clean)]) == 0  # baseline.json is not a record


def test_baseline_refresh_stops_before_any_cell_on_a_dirty_tree(tmp_path: Path, monkeypatch, capsys):
    from qbench.machine import environment

    monkeypatch.setattr(environment, "git_commit", lambda: "abc+dirty")
    suite = Path(__file__).resolve().parents[1] / "suites" / "ci.toml"
    assert cli.main(["baseline", "refresh", str(suite), "--out", str(tmp_path / "b"), "--device", "cpu"]) == 2
    assert "uncommitted changes (abc+dirty)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_compare_says_when_the_code_changed_since_the_baseline(tmp_path: Path, capsys):
    old = write_run(tmp_path / "old", make_records(run_id="old"))
    new = write_run(tmp_path / "new", [make_record(p, run_id="new", env__git_commit="def") for p in ("bf16", "int8", "nf4-dq")])
    assert cli.main(["compare", str(old), str(new)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "code changed since the baseline: baseline made at abc, new at def (git diff abc def)" in out
    assert cli.main(["compare", str(old), str(old)]) == 0
    assert "code changed" not in capsys.readouterr().out
