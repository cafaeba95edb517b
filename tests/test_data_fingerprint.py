"""One run folder is about one data set: every record carries the fingerprint of the data the run's checks read
(the bytes of each annotation or text file and of every image, or what a builtin set's generator made), a
resumption refuses a run folder whose data changed since (naming the file), a cell that finds its data changed
since the checks stops, and neither a report nor `compare` calls the effect of other data a difference of the
precisions (case resume-after-data-edit-mixes-eval-sets). Fake cells: no model is trained here."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qbench import cli
from qbench.analysis import stats
from qbench.analysis.gate import compare
from qbench.cell import pipeline
from qbench.cell.tasks.causal_lm import load_texts
from qbench.cell.tasks.clip import load_splits
from qbench.contract import records as results
from qbench.contract.exitcodes import Exit
from qbench.contract.fingerprint import DataFingerprint
from qbench.contract.suite import load
from qbench.runner import preflight

from .conftest import write_suite
from .helpers import clip
from .records import make_record

FINGERPRINT = "data.fingerprint.sha256"


@pytest.fixture
def tsv_run(tmp_path: Path, fake_cells) -> tuple[Path, dict[str, Path]]:
    """A TSV data set, its suite, and a run of it (fake cells) whose nf4 cell is missing: one left to resume."""
    data = clip.images_tsv(tmp_path / "data", train_images=12, eval_images=6, size=16)
    suite = write_suite(tmp_path, clip.suite(data=data, name="fz"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == Exit.OK
    (run,) = (tmp_path / "out" / "fz").iterdir()
    results.record_path(run, "nf4-seed0").unlink()
    return run, data


def records_of(run: Path) -> dict[str, dict]:
    return {r["cell_id"]: r for r in results.read_records(run)}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_every_record_carries_the_fingerprint_of_the_data_the_checks_read(tsv_run):
    run, data = tsv_run
    manifest = json.loads((run / "run.json").read_text())["data"]
    recorded = DataFingerprint.from_manifest(manifest)
    assert recorded is not None and recorded.files == 2 + 12 + 6 and set(recorded.data_files) == {"data.train", "data.eval"}
    assert len(recorded.images) == 18 and all(len(digest) == 64 for digest in recorded.images.values())
    record = records_of(run)["bf16-seed0"]
    assert record[FINGERPRINT] == recorded.sha256 == manifest["sha256"]
    assert record["data.fingerprint.eval_sha256"] == recorded.splits["eval"] != recorded.splits["train"]
    assert record["data.fingerprint.read_bytes"] == sum(p.stat().st_size for p in data["images"].rglob("*.png")) + \
        data["train"].stat().st_size + data["eval"].stat().st_size


def test_the_same_data_copied_elsewhere_has_the_same_fingerprint(tmp_path: Path):
    """Names inside the data set count, where it lies does not: a baseline made on another machine compares."""
    import shutil

    data = clip.images_tsv(tmp_path / "a", train_images=8, eval_images=2, size=16)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copied = {key: tmp_path / "b" / path.relative_to(tmp_path / "a") for key, path in data.items()}
    found = [preflight.check_suite(load(write_suite(tmp_path / name, clip.suite(data=paths))), check_model=False).data
             for name, paths in (("a", data), ("b", copied))]
    assert found[0].sha256 == found[1].sha256 and found[0].images == found[1].images


@pytest.mark.parametrize("edit, named", [
    ("captions", "data.eval: {eval} changed"),  # the case: same files and lines, other captions
    ("image", "data.image_root: image {images}/eval-001.png changed"),
    ("train", "data.train: {train} changed"),
])
def test_resume_refuses_a_run_folder_whose_data_changed_naming_the_file(tsv_run, capsys, edit, named):
    run, data = tsv_run
    if edit == "captions":
        lines = data["eval"].read_text().splitlines()
        paths, captions = [line.split("\t")[0] for line in lines], [line.split("\t")[1] for line in lines]
        data["eval"].write_text("".join(f"{p}\t{c}\n" for p, c in zip(paths, captions[1:] + captions[:1], strict=True)))
    elif edit == "image":
        (data["images"] / "eval-001.png").write_bytes((data["images"] / "eval-002.png").read_bytes())
    else:
        data["train"].write_text(data["train"].read_text() + data["train"].read_text().splitlines()[0] + "\n")
    before = {p.name: p.read_bytes() for p in (run / "cells").iterdir()}
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run)]) == Exit.BAD_INPUT
    line = one_error(capsys)
    assert named.format(**{k: str(v) for k, v in data.items()}) in line and "--force" in line
    assert {p.name: p.read_bytes() for p in (run / "cells").iterdir()} == before  # no cell ran


def test_a_forced_resume_records_the_new_data_and_no_difference_is_claimed_across_data(tsv_run, capsys):
    run, data = tsv_run
    (data["images"] / "eval-001.png").write_bytes((data["images"] / "eval-002.png").read_bytes())
    assert cli.main(["run", "--resume", str(run), "--force"]) == Exit.OK
    records = records_of(run)
    assert records["bf16-seed0"][FINGERPRINT] != records["nf4-seed0"][FINGERPRINT]
    assert json.loads((run / "run.json").read_text())["resumes"][-1]["data_changed"] == [
        f"data.image_root: image {data['images']}/eval-001.png changed"]


def test_a_quality_difference_across_data_sets_is_not_comparable_not_a_verdict():
    same = [make_record(p, **{FINGERPRINT: "a" * 64}) for p in ("bf16", "int8")]
    other = [make_record("bf16", **{FINGERPRINT: "a" * 64}), make_record("int8", **{FINGERPRINT: "b" * 64})]
    column = "quality.eval_after.mean_recall@1"
    assert not str(stats.compare_quality(pd.DataFrame(same), column).table.loc["int8", "verdict"]).startswith("not comparable")
    table = stats.compare_quality(pd.DataFrame(other), column).table
    assert table.loc["int8", "verdict"] == "not comparable: trained and evaluated on other data than bf16 (data fingerprint)"
    assert pd.isna(table.loc["int8", "delta"]) and pd.isna(table.loc["int8", "delta_low"])
    assert stats.relative_to_baseline(pd.DataFrame(other)).filter(like="Δ").loc["int8"].isna().all()


def test_compare_names_a_data_difference_instead_of_a_regression():
    baseline = pd.DataFrame([make_record(p, **{"data.fingerprint.eval_sha256": "a" * 64}) for p in ("bf16", "int8")])
    new = pd.DataFrame([make_record(p, **{"data.fingerprint.eval_sha256": "b" * 64, "quality.eval_after.mean_recall@1": 0.1})
                        for p in ("bf16", "int8")])
    result = compare.compare(baseline, new)
    assert result.exit_code == Exit.BAD_INPUT and not len(result.regressions)
    assert any(p.startswith("the eval data differ (data.fingerprint.eval_sha256: baseline aaaaaaaaaaaa vs new bbbbbbbbbbbb)")
               for p in result.problems)
    assert compare.compare(baseline, baseline).problems == []  # the same data: compared as before


def test_a_cell_stops_when_its_data_file_changed_since_the_checks(tmp_path: Path):
    data = clip.images_tsv(tmp_path / "data", train_images=8, eval_images=2, size=16)
    loaded = load(write_suite(tmp_path, clip.suite(data=data)))
    checked = preflight.check_suite(loaded, check_model=False).data
    read: dict[str, str] = {}
    load_splits(loaded, read)
    pipeline.same_data(checked.data_files, read, loaded)  # the same bytes: nothing to say
    data["eval"].write_text(data["eval"].read_text().replace("\t", "\tthe ", 1))
    read = {}
    load_splits(loaded, read)
    with pytest.raises(pipeline.DataChanged, match=f"data.eval: {data['eval']} changed since the run's checks read it"):
        pipeline.same_data(checked.data_files, read, loaded)


def test_builtin_sets_are_fingerprinted_by_what_they_hold_the_same_in_the_checks_and_the_cell(tmp_path: Path):
    for task, data, load_data in (("clip", 'kind = "builtin"\nname = "shapes"', load_splits),
                                  ("causal_lm", 'kind = "builtin"\nname = "pydoc"', load_texts)):
        text = clip.suite().replace('task = "clip"', f'task = "{task}"').replace('kind = "builtin"\nname = "shapes"', data)
        loaded = load(write_suite(tmp_path, text))
        checked = preflight.check_suite(loaded, check_model=False).data
        read: dict[str, str] = {}
        load_data(loaded, read)
        assert read == checked.data_files and checked.files == 0 and checked.splits["train"] != checked.splits["eval"]
        assert "generated" in checked.method or "corpus" in checked.method


# --- fuzz: data edited by hand between a run and its resumption ---------------------------------------------

EDITS = st.lists(st.one_of(
    st.tuples(st.just("caption"), st.integers(0, 5)),  # another caption on a line of eval.tsv
    st.tuples(st.just("pixels"), st.integers(0, 7)),  # one pixel of an image changed
    st.tuples(st.just("swap"), st.integers(0, 7)),  # two images swapped under their names
    st.tuples(st.just("touch"), st.integers(0, 7)),  # rewritten with the same bytes: no change
    st.tuples(st.just("blank-line"), st.just(0)),  # a blank line added to train.tsv: its bytes change
), min_size=1, max_size=3)


def _edit(data: dict[str, Path], edit: tuple[str, int]) -> None:
    kind, n = edit
    images = sorted(data["images"].glob("train-*.png"))
    if kind == "caption":
        lines = data["eval"].read_text().splitlines()
        path, caption = lines[n % len(lines)].split("\t", 1)
        lines[n % len(lines)] = f"{path}\tnot {caption}"
        data["eval"].write_text("\n".join(lines) + "\n")
    elif kind == "pixels":
        from PIL import Image

        with Image.open(images[n]) as image:
            picture = image.convert("RGB")
        red, green, blue = picture.getpixel((0, 0))
        picture.putpixel((0, 0), (255 - red, green, blue))
        picture.save(images[n])
    elif kind == "swap":
        first, second = images[n], images[(n + 1) % len(images)]
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
    elif kind == "touch":
        images[n].write_bytes(images[n].read_bytes())
    else:
        data["train"].write_text(data["train"].read_text() + "\n")


@settings(max_examples=max(3, settings.default.max_examples // 20), deadline=None)  # each example is two runs
@given(edits=EDITS)
@example(edits=[("caption", 1)])  # case resume-after-data-edit-mixes-eval-sets
@example(edits=[("touch", 0)])
def test_a_resumption_refuses_exactly_the_data_edits_that_change_bytes(edits):
    from unittest import mock

    from qbench.runner import executors as registry

    from .helpers import executors

    with tempfile.TemporaryDirectory(prefix="qbench-fuzz-data-") as scratch, \
            mock.patch.dict(registry.REGISTRY, executors.FAKE), \
            mock.patch.dict(os.environ, {"FAKE_CELL_DIR": f"{scratch}/fake", "FAKE_CELL_HOLD_S": "0"}):
        root = Path(scratch)
        data = clip.images_tsv(root / "data", train_images=8, eval_images=6, size=16)
        suite = write_suite(root, clip.suite(data=data, name="fz"))
        assert cli.main(["run", str(suite), "--out", str(root / "out"), "--device", "cpu"]) == Exit.OK
        (run,) = (root / "out" / "fz").iterdir()
        results.record_path(run, "nf4-seed0").unlink()
        before = {p: p.read_bytes() for p in [data["train"], data["eval"], *data["images"].glob("*")]}
        for edit in edits:
            _edit(data, edit)
        changed = sorted(str(p) for p, raw in before.items() if p.read_bytes() != raw)
        with mock.patch("sys.stderr", io.StringIO()) as err:
            code = cli.main(["run", "--resume", str(run)])
        if not changed:
            assert code == Exit.OK, err.getvalue()
            return
        assert code == Exit.BAD_INPUT and "the data changed since this run started" in err.getvalue()
        shown = err.getvalue()
        named = [p for p in changed if p in shown or f"image {data['images']}/{Path(p).name}" in shown]
        assert named, (changed, shown)  # one of the files that changed is named (three at most are listed)
        assert not results.record_path(run, "nf4-seed0").exists()
