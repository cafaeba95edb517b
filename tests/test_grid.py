"""The suite's grid: axes in [matrix], cell ids, exclude, --where, and the cells reaching the records,
resume and shards (fake cell processes; no model runs here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qbench import cli
from qbench.contract import grid
from qbench.contract import records as results
from qbench.contract.protocol import CellSpec, identity_fields
from qbench.contract.suite import LoadedSuite, SuiteError, load, parse
from qbench.runner import plan, resume, runner

from .conftest import SUITES, write_suite
from .helpers import clip, executors
from .test_suite import MINIMAL

QLORA_MATRIX = """[matrix]
precisions = ["bf16", "nf4-dq"]
optimizers = ["adamw", "adamw8bit", "paged_adamw8bit"]
exclude = [{ precision = "bf16", optimizer = ["adamw8bit", "paged_adamw8bit"] }]
"""
SCALING_MATRIX = """[matrix]
precisions = ["bf16", "nf4"]
batch_size = [2, 4, 8]
max_length = [32, 64]
seeds = [0, 1]
"""


def loaded(text: str) -> LoadedSuite:
    return LoadedSuite(parse(text, "s.toml"), Path("s.toml"), "0" * 64, text)


def problems_of(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def test_a_suite_without_new_axes_keeps_its_cells_and_ids():
    clip_suite = load(SUITES / "clip.toml")
    assert [c.id for c in clip_suite.cells()] == ["dense-seed0", "int8-seed0", "fp4-seed0", "fp4-dq-seed0", "nf4-seed0", "nf4-dq-seed0"]
    assert [c.id for c in clip_suite.cells(only=("nf4",), seeds=(3, 4))] == ["nf4-seed3", "nf4-seed4"]
    # every cell still carries the values of the axes the suite fixes: they reach the record
    cell = clip_suite.cells()[0]
    assert cell.values() == {"precision": "dense", "optimizer": "adamw", "lora_r": 16, "batch_size": 32, "max_length": 16,
                             "gradient_checkpointing": False, "lora_init": "kaiming", "use_dora": False,
                             "llm_int8_threshold": None, "seed": 0}
    assert clip_suite.cells()[1].values()["llm_int8_threshold"] == 6.0  # the int8 arm's, by default bitsandbytes' 6.0
    assert clip_suite.for_cell(cell).suite == clip_suite.suite


def test_a_cell_id_names_every_axis_that_varies_and_is_a_safe_file_name():
    scaling = loaded(MINIMAL + SCALING_MATRIX.replace("seeds", 'gradient_checkpointing = [false, true]\nlora_r = [8]\nseeds'))
    ids = [c.id for c in scaling.cells()]
    assert len(ids) == len(set(ids)) == 2 * 2 * 3 * 2 * 2
    assert ids[:3] == ["bf16-bs2-len32-nogc-seed0", "bf16-bs2-len32-gc-seed0", "bf16-bs2-len64-nogc-seed0"]
    assert ids[-1] == "nf4-bs8-len64-gc-seed1"
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) for i in ids)
    assert all("r8" not in i.split("-") for i in ids)  # one value: not an axis that varies, not in the id
    assert [c.id for c in scaling.cells()] == ids  # stable


def test_each_cell_runs_the_suite_with_its_axis_values_in_the_settings_they_override():
    scaling = loaded(MINIMAL + SCALING_MATRIX + 'optimizers = ["adamw8bit"]\nlora_r = [4, 8]\n')
    cell = scaling.cells(where={"batch_size": (4,), "max_length": (64,), "lora_r": (8,)})[0]
    suite = scaling.for_cell(cell).suite
    assert (suite.train.batch_size, suite.train.max_length, suite.lora.r, suite.train.optimizer) == (4, 64, 8, "adamw8bit")
    assert scaling.suite.train.batch_size == 32  # the suite itself is unchanged
    fields = identity_fields(scaling, "run", cell)
    assert fields["cell_id"] == cell.id == "bf16-r8-bs4-len64-seed0"
    assert {k: fields[k] for k in grid.RECORD_KEYS} == {
        "precision": "bf16", "config.train.optimizer": "adamw8bit", "config.lora.r": 8, "config.train.batch_size": 4,
        "config.train.max_length": 64, "config.train.gradient_checkpointing": False, "config.lora.init": "kaiming",
        "config.lora.use_dora": False, "seed": 0,
        "precision.llm_int8_threshold": None,  # an axis of int8 arms only
    }


def test_exclude_drops_combinations_and_the_qlora_suite_has_its_four_cells():
    assert [c.id for c in loaded(MINIMAL + QLORA_MATRIX).cells()] == [
        "bf16-adamw-seed0", "nf4-dq-adamw-seed0", "nf4-dq-adamw8bit-seed0", "nf4-dq-paged_adamw8bit-seed0",
    ]
    qlora = load(SUITES / "qlora.toml")
    assert [c.id for c in qlora.cells()] == [
        "bf16-adamw-seed0", "nf4-dq-adamw-seed0", "nf4-dq-adamw8bit-seed0", "nf4-dq-paged_adamw8bit-seed0",
    ]
    assert qlora.suite.baseline == "bf16"
    scaling = load(SUITES / "memory-scaling.toml")
    assert len(scaling.cells()) == 3 * 3 * 2
    assert {c.precision for c in scaling.cells()} == {"bf16", "int8", "nf4-dq"}


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ("optimiser = ['adamw']", "matrix.optimiser: unknown key (did you mean 'optimizers'?)"),
        ("optimizers = []", "matrix.optimizers: an empty axis: give at least one value, or leave the key out"),
        ("batch_size = []", "matrix.batch_size: an empty axis"),
        ("optimizers = ['adamw', 'adam8bit']", "matrix.optimizers: unknown optimizer(s) 'adam8bit' (did you mean 'adamw8bit'?)"),
        ("lora_r = [8, 8]", "matrix.lora_r: a value is listed twice"),
        ("lora_r = [0]", "matrix.lora_r.0: Input should be greater than or equal to 1"),
        ("max_length = [1]", "matrix.max_length.0: Input should be greater than or equal to 2"),
        ("gradient_checkpointing = [1]", "matrix.gradient_checkpointing.0: Input should be a valid boolean"),
        ("batch_size = 4", "matrix.batch_size: Input should be a valid tuple"),
        ("exclude = [{ optimizer = 'adamw' }]", "matrix: exclude[0]: optimizer is not listed in the matrix (matrix.optimizers)"),
        ("optimizers = ['adamw']\nexclude = [{ optimiser = 'adamw' }]", "matrix: exclude[0]: unknown axis 'optimiser' (did you mean 'optimizer'?)"),
        ("optimizers = ['adamw', 'lion8bit']\nexclude = [{ optimizer = 'adamw8bit' }]",
         "matrix: exclude[0].optimizer: 'adamw8bit' is not a value of matrix.optimizers ('adamw', 'lion8bit')"),
        ("precisions = ['bf16']\nexclude = [{ precision = 'bf16' }]", "matrix: exclude drops every cell of the matrix"),
        ("exclude = [{}]", "matrix: exclude[0]: an empty table would drop every cell"),
    ],
)
def test_an_unknown_or_empty_axis_or_value_is_one_line_naming_the_key(matrix: str, expected: str):
    problems = problems_of(MINIMAL + "[matrix]\n" + matrix + "\n")
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_an_unknown_optimizer_in_the_train_section_is_named():
    problems = problems_of(MINIMAL.replace("lr = 1e-3", "lr = 1e-3\noptimizer = 'sgd'"))
    assert len(problems) == 1 and problems[0].startswith("train.optimizer: unknown optimizer(s) 'sgd'")


def test_a_bad_grid_exits_2_with_one_line_before_any_cell(tmp_path: Path, capsys, monkeypatch):
    executors.use(monkeypatch, executors.NO_CELL)
    for matrix, expected in (
        ("optimizers = ['adamw', 'nadam']", "matrix.optimizers: unknown optimizer(s) 'nadam'"),
        ("batch_sizes = [4]", "matrix.batch_sizes: unknown key (did you mean 'batch_size'?)"),
        ("max_length = []", "matrix.max_length: an empty axis"),
    ):
        suite = write_suite(tmp_path, MINIMAL + "[matrix]\n" + matrix + "\n")
        assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {suite}: {expected}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_where_keeps_the_cells_with_the_values_asked_for():
    qlora = load(SUITES / "qlora.toml")
    chosen = plan.make(qlora, where=["optimizer=adamw8bit,paged_adamw8bit"]).cells
    assert [c.id for c in chosen] == ["nf4-dq-adamw8bit-seed0", "nf4-dq-paged_adamw8bit-seed0"]
    assert [c.id for c in plan.make(qlora, where=["optimizers=adamw", "precision=nf4-dq"]).cells] == ["nf4-dq-adamw-seed0"]
    assert [c.id for c in plan.make(qlora, only="bf16", where=["optimizer=adamw"]).cells] == ["bf16-adamw-seed0"]
    scaling = loaded(MINIMAL + SCALING_MATRIX + "gradient_checkpointing = [false, true]\n")
    cells = plan.make(scaling, where=["batch_size=4", "gradient_checkpointing=true", "seed=1"]).cells
    assert [c.id for c in cells] == ["bf16-bs4-len32-gc-seed1", "bf16-bs4-len64-gc-seed1", "nf4-bs4-len32-gc-seed1",
                                     "nf4-bs4-len64-gc-seed1"]
    assert plan.make(scaling, where=["batch_size=4"]).manifest_extras()["where"] == {"batch_size": [4]}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("optimiser=adamw", "--where: unknown axis 'optimiser' (did you mean 'optimizer'?)"),
        ("optimizer=lion8bit", "--where optimizer=lion8bit: lion8bit not among the grid's optimizer values (adamw, adamw8bit, paged_adamw8bit)"),
        ("batch_size=four", "--where: batch_size: 'four' is not an integer"),
        ("optimizer", "--where: expected AXIS=VALUE[,VALUE...]"),
        ("optimizer=", "--where: expected AXIS=VALUE[,VALUE...]"),
        ("", "--where: expected AXIS=VALUE[,VALUE...]"),
    ],
)
def test_a_bad_where_is_one_line_naming_the_option(where: str, expected: str):
    with pytest.raises(SuiteError) as caught:
        plan.make(load(SUITES / "qlora.toml"), where=[where])
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(expected), caught.value.problems


def test_where_that_leaves_no_cell_is_refused():
    with pytest.raises(SuiteError, match="no cell of the grid"):
        plan.make(load(SUITES / "qlora.toml"), where=["precision=bf16", "optimizer=adamw8bit"])


def test_cell_spec_carries_the_axes_and_old_specs_without_them_still_read():
    qlora = load(SUITES / "qlora.toml")
    cell = qlora.cells()[2]
    run = runner.Run(qlora, Path("/tmp/run"), "cpu", [cell], executors.FakeCells())
    spec = CellSpec.from_json(run.spec(cell).to_json())
    assert spec.axes["optimizer"] == "adamw8bit" and spec.cell(qlora) == cell
    old = json.loads(spec.to_json())
    del old["axes"]
    clip_suite = load(SUITES / "clip.toml")
    old.update(suite_text=clip_suite.source_text(), cell_id="nf4-seed0", precision="nf4")
    assert CellSpec.from_json(json.dumps(old)).cell(clip_suite).id == "nf4-seed0"


# --- through the runner, with fake cell processes ---------------------------------------------


@pytest.fixture(scope="module")
def grid_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=6, eval_images=3)
    text = clip.suite(checkpoint, data, None, name="gridded", steps=2, lora="r = 16\ntarget_modules = [\"q_proj\"]",
                      extra='[matrix]\nprecisions = ["bf16", "nf4"]\noptimizers = ["adamw", "adamw8bit"]\nbatch_size = [2, 4]\n')
    return write_suite(root, text)


def test_each_cell_process_gets_its_axes_and_a_dead_cells_record_still_names_them(grid_suite, fake_cells, tmp_path):
    fake_cells.setenv("FAKE_CELL_CRASH", "nf4")
    out = tmp_path / "out"
    assert cli.main(["run", str(grid_suite), "--out", str(out), "--device", "cpu", "--where", "batch_size=4"]) == 1
    (run_dir,) = (out / "gridded").iterdir()
    records = {r["cell_id"]: r for r in results.read_records(run_dir)}
    assert sorted(records) == sorted(["bf16-adamw-bs4-seed0", "bf16-adamw8bit-bs4-seed0", "nf4-adamw-bs4-seed0",
                                      "nf4-adamw8bit-bs4-seed0"])
    assert records["bf16-adamw8bit-bs4-seed0"]["test.axes"] == {
        "optimizer": "adamw8bit", "lora_r": 16, "batch_size": 4, "max_length": 16, "gradient_checkpointing": False,
        "lora_init": "kaiming", "use_dora": False, "llm_int8_threshold": None}
    crashed = records["nf4-adamw8bit-bs4-seed0"]
    assert crashed["error_type"] == "ChildProcessDied"
    assert (crashed["config.train.optimizer"], crashed["config.train.batch_size"], crashed["config.lora.r"]) == ("adamw8bit", 4, 16)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["where"] == {"batch_size": [4]}
    assert manifest["cells"][1] == {"cell_id": "bf16-adamw8bit-bs4-seed0", "precision": "bf16", "seed": 0, "axes": {
        "optimizer": "adamw8bit", "lora_r": 16, "batch_size": 4, "max_length": 16, "gradient_checkpointing": False,
        "lora_init": "kaiming", "use_dora": False, "llm_int8_threshold": None}}

    # resume rebuilds the grid's cells from run.json and runs only the two that died
    fake_cells.delenv("FAKE_CELL_CRASH")
    state = resume.open_run(run_dir)
    assert [c.id for c in state.cells] == [c["cell_id"] for c in manifest["cells"]]
    assert [c.id for c in state.pending] == ["nf4-adamw-bs4-seed0", "nf4-adamw8bit-bs4-seed0"]
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert {r["status"] for r in results.read_records(run_dir)} == {"ok"}


def test_a_run_json_cell_whose_id_does_not_match_its_axes_is_refused(grid_suite, tmp_path):
    suite = load(grid_suite)
    run_dir = tmp_path / "run"
    runner.Run(suite, run_dir, "cpu", suite.cells(), executors.FakeCells()).write_manifest()
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["cells"][0]["axes"]["optimizer"] = "adamw8bit"  # edited by hand: the id says adamw
    (run_dir / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(SuiteError, match="bf16-adamw-bs2-seed0 is not the id of its axis values"):
        resume.open_run(run_dir)


def test_shards_of_a_grid_are_exactly_one_full_run(grid_suite, fake_cells, tmp_path):
    full = plan.make(load(grid_suite), seeds="0,1").cells
    parts = [plan.make(load(grid_suite), seeds="0,1", shard=f"{i}/3").cells for i in (1, 2, 3)]
    assert sorted(c.id for part in parts for c in part) == sorted(c.id for c in full)
    assert len(full) == 16 and all(len(part) in (5, 6) for part in parts)
    out = tmp_path / "out"
    assert cli.main(["run", str(grid_suite), "--out", str(out), "--shard", "2/3", "--gpus", "0,1"]) == 0
    (run_dir,) = (out / "gridded").iterdir()
    assert sorted(r["cell_id"] for r in results.read_records(run_dir)) == sorted(c.id for c in plan.make(load(grid_suite), shard="2/3").cells)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--only", "--only: an empty list of precisions"),
        ("--seeds", "--seeds: '' is not a comma-separated list of integers"),
        ("--where", "--where: expected AXIS=VALUE[,VALUE...]"),
        ("--shard", "--shard: expected I/N such as 1/2 (got '')"),
        ("--gpus", "--gpus: expected a comma-separated list of GPU indices"),
    ],
)
def test_an_empty_filter_or_placement_is_refused_not_taken_for_the_whole_matrix(option, expected, tmp_path, capsys, monkeypatch):
    """`--only "$PRECISIONS"` with the variable unset must not run every cell (case only-empty-runs-whole-matrix)."""
    executors.use(monkeypatch, executors.NO_CELL)
    suite = write_suite(tmp_path, MINIMAL)
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu", option, ""]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
