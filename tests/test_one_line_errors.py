"""A folder or file that cannot be written or read gives one line and a documented exit code, never a
traceback, and nothing already written is damaged: a full disk at every write, --out a file or read-only,
a read-only run folder, report / compare / --resume on damaged, foreign or stray files, --markdown a folder.

A full disk is simulated by making fsync (where an atomic write lands its data) fail with ENOSPC for chosen
file names, in this process; the cells are the fake cell program (tests/fake_cell.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.contract import files
from qbench.contract import records as results
from qbench.contract.exitcodes import Exit
from qbench.runner import runner

from .conftest import write_suite
from .helpers import clip
from .records import make_record, make_records, write_run

FAKE_CELL = Path(__file__).with_name("fake_cell.py")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one-line")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=8, eval_images=3, size=16)
    return write_suite(root, clip.suite(checkpoint, data, ("bf16", "int8"), name="tiny", steps=2))


class DiskFull:
    """`disk_full(["results.csv"])`: from now on an atomic write of a file of that name fails with ENOSPC (its data
    is not on disk when fsync returns); `disk_full.free()` ends it."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            written = os.readlink(f"/proc/self/fd/{fd}")
            if any(f"/.{name}." in written for name in self.names):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(files.os, "fsync", fsync)

    def __call__(self, names: list[str]) -> None:
        self.names.extend(names)

    def free(self) -> None:
        self.names.clear()


@pytest.fixture
def disk_full(monkeypatch) -> DiskFull:
    return DiskFull(monkeypatch)


def make_read_only(folder: Path) -> None:
    """Make `folder` read-only for this process: a permission bit for a user, a read-only tmpfs for root."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return
    copy = folder.with_name(folder.name + ".copy")
    shutil.copytree(folder, copy) if folder.exists() else copy.mkdir()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a tmpfs to make a folder read-only")
    shutil.copytree(copy, folder, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


@pytest.fixture
def read_only():
    mounted: list[Path] = []

    def make(folder: Path) -> Path:
        make_read_only(folder)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:") or line.startswith("unusable:")]
    assert len(lines) == 1, err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- qbench run ---------------------------------------------------------------------------------------------


def test_out_that_is_a_file_exits_2_before_any_cell(suite, fake_cells, tmp_path, capsys):
    (tmp_path / "outfile").write_text("mine")
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "outfile"), "--device", "cpu"]) == Exit.BAD_INPUT
    assert one_error_line(capsys) == f"error: command line: --out: {tmp_path / 'outfile'} is not a folder"
    assert (tmp_path / "outfile").read_text() == "mine" and not (tmp_path / "fake").exists()  # no cell started


def test_out_read_only_exits_2_before_any_cell(suite, fake_cells, tmp_path, capsys, read_only):
    out = read_only(tmp_path / "ro")
    assert cli.main(["run", str(suite), "--out", str(out), "--device", "cpu"]) == Exit.BAD_INPUT
    assert one_error_line(capsys) == f"error: command line: --out: cannot write in {out} (read-only or no permission)"
    assert not (tmp_path / "fake").exists()


def test_a_full_disk_at_run_json_exits_2_and_leaves_no_run_folder(suite, fake_cells, tmp_path, capsys, disk_full):
    disk_full(["run.json"])
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {tmp_path / 'out' / 'tiny'}/") and line.endswith("/run.json: No space left on device")
    assert list((tmp_path / "out" / "tiny").iterdir()) == [] and not (tmp_path / "fake").exists()


def test_a_full_disk_at_results_csv_keeps_every_record_and_no_torn_table(suite, fake_cells, tmp_path, capsys, disk_full):
    disk_full(["results.csv"])
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.BAD_INPUT
    (run_dir,) = (tmp_path / "out" / "tiny").iterdir()
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run_dir / 'results.csv'}: No space left on device; every cell's record is intact")
    assert line.endswith(f"`qbench run --resume {run_dir}` writes the tables")
    assert {r["status"] for r in results.read_records(run_dir)} == {"ok"}
    assert not (run_dir / "results.csv").exists() and not list(run_dir.rglob("*.tmp"))
    disk_full.free()  # space is free again: the resume writes the tables
    assert cli.main(["run", "--resume", str(run_dir)]) == Exit.OK
    assert len(pd.read_csv(run_dir / "results.csv")) == 2


def test_a_full_disk_at_a_record_stops_the_run_with_one_line(suite, fake_cells, tmp_path, capsys, disk_full):
    fake_cells.setenv("FAKE_CELL_CRASH", "int8")  # dies without its record: the runner writes it, and cannot
    disk_full(["int8-seed0.json"])
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.FAILED
    (run_dir,) = (tmp_path / "out" / "tiny").iterdir()
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run_dir / 'cells' / 'int8-seed0.json'}: No space left on device; the run stopped")
    assert [r["cell_id"] for r in results.read_records(run_dir)] == ["bf16-seed0"]


def test_a_full_disk_leaves_an_existing_file_as_it_was(tmp_path: Path, disk_full):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    disk_full(["results.csv"])
    with pytest.raises(files.OutputError, match="cannot write .*results.csv: No space left on device"):
        files.write_text_atomic(target, "a,b\n" + "3,4\n" * 10_000)
    assert target.read_text() == "a,b\n1,2\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_full_disk_at_the_fork_server_log_is_reported_not_raised(tmp_path: Path, disk_full):
    """The fork server's log is copied beside the records when the run ends, also when the run is ending
    because the disk is full: whole or not at all, and never a traceback over the run's own line (case
    disk-full-traceback-and-half-written-results-csv, 40 KiB free)."""
    import tempfile

    from qbench.runner.launch import ForkServerLauncher

    server = ForkServerLauncher.__new__(ForkServerLauncher)  # only its log: no server process is needed
    server._log = tempfile.TemporaryFile("w+", encoding="utf-8")
    server._log.write("a warning the server printed\n" * 1000)
    disk_full(["forkserver.log"])
    problem = server.save_log(tmp_path / "logs" / "forkserver.log")
    assert problem is not None and problem.startswith(f"cannot write {tmp_path / 'logs' / 'forkserver.log'}")
    assert "No space left on device" in problem and list((tmp_path / "logs").iterdir()) == []
    disk_full.free()
    assert server.save_log(tmp_path / "logs" / "forkserver.log") is None
    assert (tmp_path / "logs" / "forkserver.log").read_text().count("a warning") == 1000


def test_a_full_disk_without_a_file_name_is_one_line_not_a_traceback(suite, tmp_path, capsys, monkeypatch):
    from qbench.runner import api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a plain write or flush raises it: no file name

    monkeypatch.setattr(api, "run_suite", full)
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith("error: No space left on device (errno 28) while writing") and "--resume" in line


# --- qbench run --resume ----------------------------------------------------------------------------------


@pytest.fixture
def run_with_a_failed_cell(suite, fake_cells, tmp_path) -> Path:
    fake_cells.setenv("FAKE_CELL_CRASH", "int8")
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.FAILED
    fake_cells.setenv("FAKE_CELL_CRASH", "")
    (run_dir,) = (tmp_path / "out" / "tiny").iterdir()
    return run_dir


def test_resume_runs_the_missing_cell_and_leaves_stray_files_alone(run_with_a_failed_cell, capsys):
    run_dir = run_with_a_failed_cell
    stray = {"notes.json": b"my notes, not json", "list.json": b"[1, 2, 3]", "other.json": json.dumps(make_record("nf4-dq")).encode()}
    for name, data in stray.items():
        (run_dir / "cells" / name).write_bytes(data)
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run_dir)]) == Exit.OK
    assert "Traceback" not in capsys.readouterr().err
    assert {name: (run_dir / "cells" / name).read_bytes() for name in stray} == stray
    assert sorted(pd.read_csv(run_dir / "results.csv")["cell_id"]) == ["bf16-seed0", "int8-seed0"]


def test_resume_refuses_a_record_file_holding_another_suites_record(run_with_a_failed_cell, capsys):
    run_dir = run_with_a_failed_cell
    foreign = json.dumps(make_record("int8", suite="clip", cell_id="int8-seed0")).encode()
    (run_dir / "cells" / "int8-seed0.json").write_bytes(foreign)
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run_dir)]) == Exit.BAD_INPUT
    line = one_error_line(capsys)
    assert f"{run_dir / 'cells' / 'int8-seed0.json'}: holds a record of another suite" in line
    assert (run_dir / "cells" / "int8-seed0.json").read_bytes() == foreign


def test_resume_of_a_read_only_run_folder_exits_2_before_any_cell(run_with_a_failed_cell, capsys, read_only):
    run_dir = read_only(run_with_a_failed_cell)
    before = tree(run_dir)
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run_dir)]) == Exit.BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run_dir}/") and line.endswith(("Read-only file system", "Permission denied"))
    assert tree(run_dir) == before


def test_resume_of_a_run_folder_in_use_is_refused(run_with_a_failed_cell, capsys):
    with runner.exclusive(run_with_a_failed_cell):
        assert cli.main(["run", "--resume", str(run_with_a_failed_cell)]) == Exit.BAD_INPUT
    assert "another qbench command is running cells in this run folder now" in one_error_line(capsys)


# --- qbench report ------------------------------------------------------------------------------------------


def test_report_on_an_exported_results_csv_writes_the_report_beside_it(tmp_path: Path, capsys):
    run = write_run(tmp_path / "run", make_records())
    pd.DataFrame(make_records()).to_csv(run / "results.csv", index=False)
    assert cli.main(["report", str(run / "results.csv")]) == Exit.OK
    assert (run / "results-report" / "report.html").is_file() and (run / "results.csv").is_file()


def test_report_refuses_to_merge_runs_of_different_suites(tmp_path: Path, capsys):
    ci = write_run(tmp_path / "a", make_records(run_id="a"))
    tiny = write_run(tmp_path / "b", [make_record(p, run_id="b", suite="tiny", config__train__steps=3) for p in ("bf16", "int8")])
    assert cli.main(["report", str(ci), str(tiny), "--out", str(tmp_path / "rep")]) == Exit.BAD_INPUT
    line = one_error_line(capsys)
    assert "are not merged into one report (suite differs: ci, tiny; config.train.steps differs: 3, 8)" in line
    assert not (tmp_path / "rep").exists()
    # a grid axis (LoRA rank) may differ: the report keeps each value apart as an arm
    ranks = write_run(tmp_path / "c", [make_record(p, run_id="c", config__lora__r=4) for p in ("bf16", "int8")])
    assert cli.main(["report", str(ci), str(ranks), "--out", str(tmp_path / "rep")]) == Exit.OK


def test_report_into_a_folder_of_other_files_is_refused_and_leaves_them(tmp_path: Path, capsys):
    run = write_run(tmp_path / "run", make_records())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.csv").write_text("my own table")
    (mine / "notes.txt").write_text("my notes")
    assert cli.main(["report", str(run), "--out", str(mine)]) == Exit.BAD_INPUT
    assert "holds files qbench did not write there (notes.txt, report.csv; no .qbench-owned.json" in one_error_line(capsys)
    assert tree(mine) == {"report.csv": b"my own table", "notes.txt": b"my notes"}
    # files named as a report's are a person's all the same (case report-out-replaces-user-files)
    for folder, own in [("docs", {"report.md": b"# My thesis notes", "plots/my-diagram.png": b"\x89PNG mine"}),
                        ("notes", {"summary.csv": b"my,own,data"})]:
        for name, data in own.items():
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_bytes(data)
        assert cli.main(["report", str(run), "--out", str(tmp_path / folder)]) == Exit.BAD_INPUT
        assert "holds files qbench did not write there" in one_error_line(capsys)
        assert tree(tmp_path / folder) == own
    assert cli.main(["report", str(run)]) == Exit.OK  # an earlier report is replaced whole
    first = tree(run / "report")
    assert cli.main(["report", str(run), "--title", "again"]) == Exit.OK
    assert set(tree(run / "report")) == set(first) and b"again" in (run / "report" / "report.html").read_bytes()
    assert sorted(p.name for p in run.iterdir()) == ["cells", "report"]  # no staging or old folder left


def test_report_on_a_full_disk_leaves_the_earlier_report(tmp_path: Path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", make_records())
    assert cli.main(["report", str(run)]) == Exit.OK
    before = tree(run / "report")
    real_write_text = Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if self.name == "report.html":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert cli.main(["report", str(run), "--title", "new"]) == Exit.BAD_INPUT
    assert one_error_line(capsys) == f"error: cannot write {run / 'report' / 'report.html'}: No space left on device"
    assert tree(run / "report") == before and sorted(p.name for p in run.iterdir()) == ["cells", "report"]


@pytest.mark.parametrize("stray, why", [
    (b"[1, 2, 3]", "not a cell record (a JSON list, not an object)"),
    (b"my notes", "not a cell record (not JSON"),
    (b'{"cell_id": "bf16-seed0", "precision": "bf16", "status": "ok"}', "holds the record of cell 'bf16-seed0', not of 'notes'"),
    (b'{"cell_id": "notes", "precision": "bf16", "status": "done"}', "not a cell record (status 'done' is none of"),
])
def test_report_and_compare_name_a_file_in_cells_that_is_not_a_record(tmp_path: Path, capsys, stray: bytes, why: str):
    base = write_run(tmp_path / "base", make_records())
    new = write_run(tmp_path / "new", make_records())
    (new / "cells" / "notes.json").write_bytes(stray)
    for command in (["report", str(new)], ["compare", str(base), str(new)]):
        assert cli.main(command) == Exit.BAD_INPUT
        assert f"{new / 'cells' / 'notes.json'}: {why}" in one_error_line(capsys)
    assert (new / "cells" / "notes.json").read_bytes() == stray and not (new / "report").exists()


# --- qbench compare -----------------------------------------------------------------------------------------


def test_compare_with_a_folder_for_markdown_exits_2_naming_it(tmp_path: Path, capsys):
    base = write_run(tmp_path / "base", make_records())
    (tmp_path / "md").mkdir()
    assert cli.main(["compare", str(base), str(base), "--markdown", str(tmp_path / "md")]) == Exit.BAD_INPUT
    assert one_error_line(capsys) == f"error: command line: --markdown: {tmp_path / 'md'} is a folder; name a file to append the summary to"


def test_compare_that_compares_nothing_is_unusable(tmp_path: Path, capsys):
    failed = [make_record(p, status="failed", error="boom") for p in ("bf16", "int8")]
    base = write_run(tmp_path / "base", failed)
    new = write_run(tmp_path / "new", make_records(("bf16", "int8")))
    assert cli.main(["compare", str(base), str(new)]) == Exit.BAD_INPUT
    assert "nothing was compared: no cell of the baseline is ok" in one_error_line(capsys)
    (tmp_path / "minimal.csv").write_text("schema_version,precision,status\n3,bf16,ok\n3,nf4,ok\n")
    assert cli.main(["compare", str(tmp_path / "minimal.csv"), str(tmp_path / "minimal.csv")]) == Exit.BAD_INPUT
    assert "nothing was compared: the baseline holds no value of a metric the gate checks" in one_error_line(capsys)
    good = write_run(tmp_path / "good", make_records(("bf16", "int8")))
    assert cli.main(["compare", str(good), str(new), "--tolerance", "*=ignore"]) == Exit.BAD_INPUT
    assert "nothing was compared: every metric of the baseline is ignored" in one_error_line(capsys)
    assert cli.main(["compare", str(good), str(new)]) == Exit.OK


def test_compare_names_a_metric_column_that_holds_text(tmp_path: Path, capsys):
    base = write_run(tmp_path / "base", make_records())
    table = pd.DataFrame(make_records())
    table["weights.load.base_bytes"] = "lots"
    table.to_csv(tmp_path / "new.csv", index=False)
    assert cli.main(["compare", str(base), str(tmp_path / "new.csv")]) == Exit.BAD_INPUT
    assert f"{tmp_path / 'new.csv'}: column weights.load.base_bytes: 'lots' is not a number" in one_error_line(capsys)
