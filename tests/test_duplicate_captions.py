"""Captions with identical text are positives of every image that carries them (issue 18, deliverable 4)."""

from __future__ import annotations

from pathlib import Path

import torch

from qbench.cell.data.pairs import ClipSplit, duplicate_captions, positives
from qbench.cell.tasks.clip import ClipTask
from qbench.cell.tasks.metrics import recall_at_k
from qbench.contract import suite as spec

from .conftest import write_suite
from .helpers import clip


def test_identical_captions_are_positives_of_every_image_that_carries_them():
    split = ClipSplit(images=["i0", "i1", "i2", "i3"], captions=["a red square", "a red square", "a blue bar", "a dot"],
                      caption_image=[0, 1, 2, 2])
    assert positives(split).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    assert duplicate_captions(split) == 2  # two captions share their text with another image's caption
    assert positives(split).T.sum(dim=1).tolist() == [2, 2, 2, 0]  # image 3 has no caption, so no positive


def test_two_captions_of_one_image_with_the_same_text_are_not_duplicates():
    split = ClipSplit(images=["i0", "i1"], captions=["a red square", "a red square", "a bar"], caption_image=[0, 0, 1])
    assert duplicate_captions(split) == 0
    assert positives(split).int().tolist() == [[1, 0], [1, 0], [0, 1]]


def test_ten_images_with_five_caption_texts_are_no_longer_frozen_at_a_tie():
    """The issue's eval set: 10 images, 5 distinct captions, and a model that gets every pair right."""
    texts = torch.nn.functional.normalize(torch.eye(5, 8) + 0.1, dim=-1)
    caption_of_image = [i // 2 for i in range(10)]
    images = torch.nn.functional.normalize(texts[caption_of_image] + 0.01 * torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    captions = [f"caption {c}" for c in caption_of_image]
    split = ClipSplit(images=list(range(10)), captions=captions, caption_image=list(range(10)))
    similarity = texts[caption_of_image] @ images.T  # identical texts, identical embeddings: they tie
    matches = positives(split)
    assert recall_at_k(similarity, matches, (1,)) == {1: 1.0}
    assert recall_at_k(similarity.T, matches.T, (1,)) == {1: 1.0}
    one_image_each = torch.eye(10, dtype=torch.bool)  # what qbench used to take: every tie counted against
    assert recall_at_k(similarity.T, one_image_each.T, (1,))[1] == 0.0


def test_the_clip_task_counts_captions_the_model_reads_as_the_same_text(tmp_path: Path, tiny_clip_dir: Path):
    data = clip.images_tsv(tmp_path / "data", eval_images=6, size=16)
    lines = data["eval"].read_text().splitlines()
    first_caption = lines[0].split("\t")[1]
    second_image = lines[1].split("\t")[0]
    # the same words with other spacing: the tokenizer reads the same tokens
    lines[1] = f"{second_image}\t{first_caption.replace(' ', '  ')}"
    data["eval"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = spec.load(write_suite(tmp_path, clip.suite(tiny_clip_dir, data)))
    task = ClipTask(loaded, str(tiny_clip_dir), "cpu")
    info = task.prepare_data()
    assert info["data.eval_duplicate_captions"] == 2
    assert task.positives[:2, :2].all() and int(task.positives.sum()) == 6 + 2
    assert "same tokens are positives of every image" in info["eval.protocol"]
