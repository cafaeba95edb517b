"""How a run's cells start (forked or not, how many side by side, on which device) is settled once per run
folder: found before any cell when it cannot be, and kept by --resume (a forked cell's PSS shares pages with
the fork server and its siblings, so a run that mixed launchers would mix memory figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qbench import cli
from qbench.contract.suite import load
from qbench.runner import executors, plan

from .conftest import write_suite
from .helpers import clip


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run-shape")
    checkpoint = clip.checkpoint(root / "ckpt")
    data = clip.images_tsv(root / "data", train_images=8, eval_images=3, size=16)
    return write_suite(root, clip.suite(checkpoint, data, ("bf16", "nf4"), name="shape", steps=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU torch can use")
@pytest.mark.parametrize("options", [["--device", "cuda"], ["--device", "cuda", "--check"], ["--gpus", "0"]])
def test_cuda_asked_of_a_torch_that_sees_no_gpu_stops_before_any_cell(suite: Path, tmp_path: Path, capsys, options):
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), *options]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "torch sees no CUDA GPU on this machine" in line
    assert not out.exists()  # no run folder, no cell


def test_parallel_beyond_the_cells_runs_no_more_side_by_side_than_there_are_cells(suite: Path):
    run_plan = plan.make(load(suite), parallel=8, device="cpu")
    assert len(run_plan.slots) == 2 and run_plan.parallel == 2
    assert run_plan.threads.side_by_side == 2
    assert len(plan.make(load(suite), only="nf4", parallel=8, device="cpu").slots) == 1


def test_resume_starts_cells_as_the_run_did_and_refuses_another_launcher(suite: Path, tmp_path: Path, fake_cells, capsys):
    out = tmp_path / "out"
    fake_cells.setenv("FAKE_CELL_CRASH", "nf4")
    assert cli.main(["run", str(suite), "--out", str(out), "--device", "cpu", "--launcher", "subprocess"]) == 1
    (run_dir,) = (out / "shape").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["cell_launcher"] == "subprocess"
    capsys.readouterr()

    assert cli.main(["run", "--resume", str(run_dir), "--launcher", "forkserver"]) == 2
    assert "drop --launcher" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(run_dir), "--executor", "forkserver"]) == 2
    assert "started its cells as subprocess; resume it the same way" in " ".join(capsys.readouterr().err.split())

    asked: list[str] = []
    real_get = executors.get
    fake_cells.setattr(executors, "get", lambda name: asked.append(name) or real_get(name))
    fake_cells.delenv("FAKE_CELL_CRASH")
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert asked == ["subprocess"]  # not a fork server: the run's other cell did not start from one


@pytest.mark.parametrize("options", [{"device": "cuda"}, {"gpus": "0"}])
def test_a_fork_server_asked_for_where_cells_cannot_be_forked_is_refused(suite: Path, options):
    from qbench.contract.suite import SuiteError

    with pytest.raises(SuiteError) as refused:
        plan.make(load(suite), executor="forkserver", **options)
    assert refused.value.problems[0].startswith("--executor forkserver: a fork server cannot fork cells that use CUDA")


def test_a_fork_server_asked_for_on_another_executor_is_refused(suite: Path, tmp_path: Path, capsys):
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out"), "--executor", "ray", "--launcher", "forkserver"]) == 2
    assert "--launcher forkserver: with --executor ray each cell is its own job's process" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
