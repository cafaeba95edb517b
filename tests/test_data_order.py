"""The training data order is the seed's alone: DataLoader workers (data.num_workers) change the speed and the
memory of a cell, never which batches it trains on (MONAI#4569: torch draws its workers' base seed from the
loader's generator each time it makes an iterator, which a shared generator turns into another order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qbench.cell.tasks.clip import EpochOrder

from .helpers import clip


def _batches(loader: torch.utils.data.DataLoader, epochs: int) -> list[list[int]]:
    return [batch.tolist() for _ in range(epochs) for batch in loader]


def test_epoch_order_is_the_order_of_a_plain_single_process_loader():
    """Three epochs of EpochOrder are those of DataLoader(shuffle=True, generator=...) without workers: a bare torch
    loop with the same seed trains on the same batches as qbench."""
    data = list(range(23))
    plain = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(7))
    ours = torch.utils.data.DataLoader(data, batch_size=4, sampler=EpochOrder(len(data), 7), drop_last=True,
                                       generator=torch.Generator().manual_seed(7))
    assert _batches(ours, 3) == _batches(plain, 3)


def test_a_shared_generator_would_change_the_order_with_persistent_workers():
    """The failure this guards against, shown on torch itself: with the shuffling generator shared, epoch two differs
    between 0 and 2 persistent workers (if torch ever stops drawing the base seed from it, this test says so)."""
    data = list(range(16))

    def loader(workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                                           num_workers=workers, persistent_workers=workers > 0)

    without, with_workers = _batches(loader(0), 2), _batches(loader(2), 2)
    assert without[:4] == with_workers[:4] and without[4:] != with_workers[4:]


def test_epoch_order_is_the_same_with_and_without_persistent_workers():
    data = list(range(16))
    orders = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=EpochOrder(len(data), 0),
                                             generator=torch.Generator().manual_seed(0), num_workers=workers,
                                             persistent_workers=workers > 0)
        orders.append(_batches(loader, 3))
    assert orders[0] == orders[1]


CASE_SUITE = clip.suite(  # the handed case's suite: its data relative to the suite file, WORKERS replaced per run
    data={"train": Path("data/train.tsv"), "eval": Path("data/eval.tsv"), "images": Path("data/images")},
    precisions=("dense",), name="workers", settings='compute_dtype = "float32"\nbaseline = "dense"\nthreads = 1', steps=6,
    train="batch_size = 4\nlr = 2e-3\nmax_length = 16\nuntimed_steps = 1", data_extra="num_workers = WORKERS",
    lora='r = 8\nalpha = 16\ndropout = 0.1\ntarget_modules = ["q_proj", "v_proj"]', evaluation="batch_size = 16\nrecall_k = [1, 5]",
)


def _case_inputs(folder: Path) -> None:
    """The handed case's data (dataloader-workers-change-data-order): 12 image-caption pairs per split, pictures of
    1x1, 64x1, 64x3, 3x64, 48x48 and 2x2 pixels."""
    from PIL import Image

    images = folder / "data" / "images"
    images.mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    sizes = [(1, 1), (64, 1), (64, 3), (3, 64), (48, 48), (2, 2)]
    for split, skip in (("train", 0), ("eval", 1)):
        lines = []
        for i, (name, rgb) in enumerate(colours.items()):
            for j, size in enumerate(sizes):
                if (i + j) % 2 == skip:
                    continue
                file = f"{split}-{name}-{size[0]}x{size[1]}.png"
                Image.new("RGB", size, rgb).save(images / file)
                lines.append(f"{file}\ta {name} square")
        (folder / "data" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_num_workers_0_and_2_train_and_score_alike(tmp_path):
    """The handed case: the same suite with num_workers 0 and 2 (6 steps of 4 over 12 pairs: two epochs) gives the
    same losses and recall to the last digit (it gave final losses 0.0014 and 0.694), and each record says how many
    workers ran."""
    from qbench import cli
    from qbench.contract import records

    _case_inputs(tmp_path)
    found = {}
    for workers in (0, 2):
        suite = tmp_path / f"suite-w{workers}.toml"
        suite.write_text(CASE_SUITE.replace("WORKERS", str(workers)))
        assert cli.main(["run", str(suite), "--device", "cpu", "--out", str(tmp_path / f"results-w{workers}")]) == 0
        (run_dir,) = (tmp_path / f"results-w{workers}" / "workers").iterdir()
        (found[workers],) = records.read_records(run_dir)
    for workers, record in found.items():
        assert record["status"] == "ok" and record["config.data.num_workers"] == workers
    keys = ("train.first_loss", "train.final_loss", "quality.eval_after.mean_recall@1", "quality.eval_after.i2t_recall@5")
    assert json.dumps([found[0][k] for k in keys]) == json.dumps([found[2][k] for k in keys])
