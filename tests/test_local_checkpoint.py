"""The user's setup on disk: a local CLIP checkpoint folder and a TSV file of real image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench import cli
from qbench.cell.data.pairs import positives
from qbench.cell.data.tsv import load_tsv
from qbench.contract import records as results

from .conftest import write_suite
from .helpers import clip

EVERY_PRECISION = ["bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq"]


def test_the_user_tsv_format_skips_blank_lines_and_takes_several_captions_per_image(tmp_path: Path):
    data = clip.images_tsv(tmp_path, train_images=6, eval_images=4, size=48, user_format=True)
    train = load_tsv(data["train"], data["images"])
    # 6 images; the odd ones carry a second caption on a line of its own
    assert len(train.images) == 6 and len(train.captions) == 9
    assert train.caption_image == [0, 1, 1, 2, 3, 3, 4, 5, 5]
    assert train.captions[1:3] == ["a red square on a black background", "a photo of a red square"]
    held_out = load_tsv(data["eval"], data["images"])
    # in eval the second caption is a repeated line with the same image path: still one image
    assert len(held_out.images) == 4 and len(held_out.captions) == 6
    assert positives(held_out).sum(dim=1).tolist() == [1] * 6
    assert positives(held_out).sum(dim=0).tolist() == [1, 2, 1, 2]
    assert all(path.is_file() and path.is_relative_to(data["images"].resolve()) for path in held_out.images)


def test_windows_line_endings_and_a_byte_order_mark_are_read_as_the_same_lines(tmp_path: Path):
    data = clip.images_tsv(tmp_path, train_images=3, eval_images=1, size=48, user_format=True)
    text = data["train"].read_text(encoding="utf-8")
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert load_tsv(crlf, data["images"]) == load_tsv(data["train"], data["images"])


@pytest.fixture(scope="module")
def local_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("local")
    return {"checkpoint": clip.checkpoint(root / "my-clip", image_size=32, patch_size=8, text_positions=32), **clip.images_tsv(root / "data", size=48, user_format=True)}


@pytest.mark.slow
def test_every_precision_runs_to_ok_on_a_local_checkpoint_and_tsv_images(local_setup, tmp_path: Path):
    """The whole matrix, with the user's LoRA settings, gradient accumulation, DataLoader workers
    decoding the image files, and model.device_map = "auto" (accelerate places the base)."""
    suite = write_suite(
        tmp_path,
        clip.suite(
            local_setup["checkpoint"],
            local_setup,
            None,
            name="local",
            steps=None,
            lora=clip.USER_LORA,
            evaluation=None,
            train="steps = 2\nbatch_size = 4\ngrad_accum = 2\nlr = 1e-3\nscheduler = \"cosine\"\nwarmup_steps = 1\n"
            "max_length = 32\nuntimed_steps = 1",
            extra=f"[eval]\nbatch_size = 8\nbefore = false\n[matrix]\nprecisions = {EVERY_PRECISION}\n",
            model_extra='device_map = "auto"',
            data_extra="num_workers = 2",
        ),
    )
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--device", "cpu"]) == 0
    (run_dir,) = (out / "local").iterdir()
    records = {r["precision"]: r for r in results.read_records(run_dir)}
    assert list(records) and sorted(records) == sorted(EVERY_PRECISION)
    for precision, record in records.items():
        assert record["status"] == "ok", (precision, record.get("error"))
        assert record["model_path"] == str(local_setup["checkpoint"].resolve())
        assert record["data.train_images"] == 12 and record["data.train_captions"] == 18
        assert record["data.eval_images"] == 6 and record["data.eval_captions"] == 9
        assert record["config.train.grad_accum"] == 2 and record["config.lora.r"] == 16
        assert record["speed.timed_steps"] == 1
        assert record["config.device_map"] == "auto" and record["model.devices"] == "cpu"
        clip.assert_recall_is_an_exact_share(record, "eval_after")
    assert records["nf4-dq"]["weights.load.linears.linear4bit_count"] > 0 and records["int8"]["weights.load.linears.linear8bitlt_count"] > 0
    assert records["nf4"]["weights.load.base_bytes"] < records["int8"]["weights.load.base_bytes"] < records["bf16"]["weights.load.base_bytes"]
