"""Nothing lost: names that become paths stay where they belong, a baseline or report is replaced only when
qbench wrote it, run folders are created exclusively, and a stale cell process cannot write over a newer
record (the parent-death tests with real cells are in test_parent_death.py)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from qbench import cli
from qbench.analysis.gate import baseline
from qbench.contract import files
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec
from qbench.contract.schema import SCHEMA_VERSION
from qbench.contract.suite import SuiteError, parse
from qbench.runner import runner

from .conftest import write_suite
from .helpers import clip
from .records import make_records, write_run


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (what must not change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- names that become paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "...", ".hidden", "x" * 101])
def test_a_suite_name_that_is_not_a_plain_folder_name_is_refused(name: str):
    with pytest.raises(SuiteError) as raised:
        parse(clip.suite(name=name), "suite.toml")
    (problem,) = raised.value.problems
    assert problem.startswith("name: ")


def test_baseline_refresh_of_a_suite_named_dotdot_touches_nothing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "baselines" / "ci" / "20261128-000000").mkdir(parents=True)
    (tmp_path / "results" / "baselines" / "ci" / "20261128-000000" / "run.json").write_text("committed baseline")
    (tmp_path / "results" / "clip" / "run").mkdir(parents=True)
    (tmp_path / "results" / "clip" / "run" / "run.json").write_text("weeks of GPU time")
    before = tree(tmp_path / "results")
    suite = write_suite(tmp_path, clip.suite(name=".."))
    assert cli.main(["baseline", "refresh", str(suite), "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {suite}: name: '..' is not a valid suite name")
    assert tree(tmp_path / "results") == before


def test_install_refuses_a_suite_name_that_leaves_the_baselines_folder(tmp_path: Path):
    run = write_run(tmp_path / "run", make_records(), suite_text='name = "ci"\n')
    (tmp_path / "keep.txt").write_text("mine")
    for name in ("..", ".", "a/b", ""):
        with pytest.raises(baseline.BaselineError, match="not a valid suite name"):
            baseline.install([run], tmp_path / "baselines", name)
    assert (tmp_path / "keep.txt").read_text() == "mine" and (run / "cells").is_dir()


def test_install_without_runs_or_over_a_foreign_folder_leaves_it_as_it_was(tmp_path: Path):
    old = write_run(tmp_path / "baselines" / "ci" / "old", make_records(run_id="old"))
    files.mark_owned(old.parent, "qbench baseline refresh")  # as an earlier refresh leaves it
    run = write_run(tmp_path / "run", make_records(run_id="new"))
    before = tree(tmp_path / "baselines")
    with pytest.raises(baseline.BaselineError, match="no finished run"):
        baseline.install([], tmp_path / "baselines", "ci")  # the old code replaced the baseline with nothing
    (old.parent / "NOTES.md").write_text("my notes on the baseline")
    before = tree(tmp_path / "baselines")
    with pytest.raises(baseline.BaselineError, match=r"holds files qbench did not write there \(NOTES.md\)"):
        baseline.install([run], tmp_path / "baselines", "ci")
    assert tree(tmp_path / "baselines") == before
    (old.parent / "NOTES.md").unlink()
    (old / "summary.md").write_text("my own summary, under a name a baseline keeps")
    with pytest.raises(baseline.BaselineError, match=r"holds files qbench did not write there \(old/summary.md\)"):
        baseline.install([run], tmp_path / "baselines", "ci")
    (old / "summary.md").unlink()
    (old / "cells" / "bf16-seed0.json").write_text(json.dumps({**make_records()[0], "weights.load.base_bytes": 1}))  # edited by hand
    with pytest.raises(baseline.BaselineError, match="old/cells/bf16-seed0.json was changed since qbench wrote it"):
        baseline.install([run], tmp_path / "baselines", "ci")
    other = write_run(tmp_path / "baselines" / "ci" / "other", make_records(run_id="other"))
    (other / "cells" / "bf16-seed0.json").write_text(json.dumps({**make_records()[0], "suite": "clip"}))
    files.mark_owned(old.parent, "qbench baseline refresh")
    with pytest.raises(baseline.BaselineError, match="is not a run of suite 'ci'"):
        baseline.install([run], tmp_path / "baselines", "ci")
    assert sorted(p.name for p in (tmp_path / "baselines").iterdir()) == ["ci"]  # no staging folder left


def test_record_files_are_named_only_by_plain_cell_ids(tmp_path: Path):
    assert results.record_path(tmp_path, "nf4-dq-seed0") == tmp_path / "cells" / "nf4-dq-seed0.json"
    for cell_id in ("../x", "..", "a/b", ""):
        with pytest.raises(ValueError, match="cannot name a record file"):
            results.record_path(tmp_path, cell_id)


def test_run_folders_started_at_the_same_moment_are_never_shared(tmp_path: Path):
    made: list[Path] = []
    barrier = threading.Barrier(12)

    def start() -> None:
        barrier.wait()
        made.append(runner.create_run_dir(tmp_path / "out", "ci", "shard1of2"))

    threads = [threading.Thread(target=start) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 12 and all(p.is_dir() and p.parent == tmp_path / "out" / "ci" for p in made)
    with pytest.raises(ValueError, match="not a valid suite name"):
        runner.create_run_dir(tmp_path / "out", "..")


def test_a_folder_is_replaced_only_when_its_marker_lists_all_it_holds_as_written(tmp_path: Path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "theirs.txt").write_text("not qbench's")
    staging = files.staging_dir(target)
    (staging / "new.txt").write_text("new")
    with pytest.raises(files.NotOwned, match=r"holds files qbench did not write there \(theirs.txt; no .qbench-owned.json"):
        files.publish_dir(staging, target)  # whatever the caller's own check says
    assert (target / "theirs.txt").read_text() == "not qbench's" and not staging.exists()
    (target / "theirs.txt").unlink()
    staging = files.staging_dir(target)
    (staging / "new.txt").write_text("new")
    (staging / "plots").mkdir()
    (staging / "plots" / "a.png").write_bytes(b"png")
    files.publish_dir(staging, target, written_by="test")
    assert sorted(p.name for p in target.iterdir()) == [files.OWNED_MARKER, "new.txt", "plots"]
    assert files.ownership_problem(target) is None
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # neither staging nor the old folder is left
    # what qbench wrote there, changed or joined by a person's file under any name, makes the folder theirs
    for change, problem in [(lambda: (target / "new.txt").write_text("edited"), "new.txt was changed since qbench wrote it"),
                            (lambda: (target / "plots" / "mine.png").write_bytes(b"mine"), "did not write there (plots/mine.png)"),
                            (lambda: (target / "report.md").write_text("# my report"), "did not write there (report.md)"),
                            (lambda: (target / "empty").mkdir(), "holds folders qbench did not write there (empty)"),
                            (lambda: (target / "link").symlink_to(tmp_path), "did not write there (link)")]:
        before = {path.relative_to(target).as_posix() for path in target.rglob("*")}
        change()
        assert problem in files.ownership_problem(target)
        staging = files.staging_dir(target)
        with pytest.raises(files.NotOwned, match=re.escape(problem)):
            files.publish_dir(staging, target, lambda folder: None)
        assert not staging.exists()
        for path in sorted(target.rglob("*"), reverse=True):  # undo the change
            relative = path.relative_to(target).as_posix()
            if relative not in before:
                path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        (target / "new.txt").write_text("new")
        assert files.ownership_problem(target) is None


# --- attempts: a stale cell process cannot write over a newer record --------------------------------------


def test_a_stale_attempt_cannot_write_over_the_record_of_a_newer_one(tmp_path: Path):
    record_file = results.record_path(tmp_path, "nf4-seed0")
    cell = {"schema_version": SCHEMA_VERSION, "cell_id": "nf4-seed0", "precision": "nf4"}
    first = results.claim_record(record_file)
    results.write_record(record_file, {**cell, "status": "running", "test.by": "first"}, first)
    second = results.claim_record(record_file)  # a resume started the cell again
    results.write_record(record_file, {**cell, "status": "ok", "test.by": "second"}, second)
    with pytest.raises(results.Superseded):
        results.write_record(record_file, {**cell, "status": "failed", "test.by": "first"}, first)
    assert json.loads(record_file.read_text()) == {**cell, "status": "ok", "test.by": "second"}
    assert [p.name for p in record_file.parent.glob("*.json")] == ["nf4-seed0.json"]  # the attempt file is no record


def test_a_cell_of_a_superseded_attempt_stops_without_writing(tmp_path: Path):
    from qbench.cell import pipeline

    suite_text = clip.suite(name="ci")
    record_file = results.record_path(tmp_path, "bf16-seed0")
    stale = results.claim_record(record_file)
    results.claim_record(record_file)
    results.write_json_atomic(record_file, {"status": "ok", "by": "the newer attempt"})
    spec = CellSpec(suite_text, str(tmp_path / "suite.toml"), "0" * 64, "run", "bf16-seed0", "bf16", 0, "cpu",
                    str(record_file), attempt=stale)
    cell = pipeline.CellRun(spec)
    with pytest.raises(results.Superseded), cell.recorded(), cell.phase("data"):
        pass
    assert json.loads(record_file.read_text()) == {"status": "ok", "by": "the newer attempt"}


def test_a_cell_whose_runner_closed_its_pipe_stops_as_interrupted(monkeypatch):
    from qbench.cell import pipeline

    class DeadPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(pipeline, "_pipe_closed", False)
    monkeypatch.setattr(pipeline, "_silence_stdout", lambda: None)
    monkeypatch.setattr("sys.stdout", DeadPipe())
    with pytest.raises(pipeline.RunnerGone):
        pipeline.emit("phase", phase="load")
    pipeline.emit("done", status="interrupted")  # once gone, quiet: the record is still written
    assert pipeline._status_for(pipeline.RunnerGone("gone")) == "interrupted"


def test_a_cell_started_by_a_parent_that_is_already_gone_stops_at_once():
    from qbench.cell import pipeline

    with pytest.raises(pipeline.RunnerGone, match=r"the runner \(pid 1\) is gone"):
        pipeline.check_parent(1)  # pid 1 is never this test's parent
    pipeline.check_parent(0)  # no parent to check: a cell run on its own


def test_a_second_command_on_a_busy_run_folder_is_refused(tmp_path: Path):
    with runner.exclusive(tmp_path):
        with pytest.raises(runner.RunDirBusy):
            with runner.exclusive(tmp_path):
                pass
    with runner.exclusive(tmp_path):  # released when the first one ended
        pass


def test_files_written_atomically_get_the_mode_a_plain_open_would_give(tmp_path: Path):
    """Records, run.json and tables are readable by whoever the umask lets read them (mkstemp alone gives 0600,
    which hid a shared results folder's records from its other users)."""
    import os
    import stat

    files.write_json_atomic(tmp_path / "record.json", {"status": "ok"})
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(os.stat(tmp_path / "record.json").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~files.UMASK
