"""The generated "shapes" dataset: deterministic, well-formed, with disjoint shifted splits."""

import numpy as np
import pytest

from qbench.cell.data import shapes


@pytest.fixture(scope="module")
def pretrain():
    return shapes.make_split("pretrain", seed=0)


@pytest.fixture(scope="module")
def shifted_train():
    return shapes.make_split("shifted-train", seed=0)


@pytest.fixture(scope="module")
def shifted_eval():
    return shapes.make_split("shifted-eval", seed=0)


def _pixels(split):
    return [image.tobytes() for image in split.images]


def test_splits_lists_exactly_the_splits_make_split_accepts():
    assert set(shapes.SPLITS) == {"pretrain", "shifted-train", "shifted-eval"}
    assert all(isinstance(text, str) and text for text in shapes.SPLITS.values())


def test_unknown_split_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="shifted-eval"):
        shapes.make_split("no-such-split")


@pytest.mark.parametrize("name", ["shifted-train", "shifted-eval"])
def test_same_seed_gives_byte_identical_images_and_captions(name, shifted_train, shifted_eval):
    first = {"shifted-train": shifted_train, "shifted-eval": shifted_eval}[name]
    again = shapes.make_split(name, seed=0)
    assert again.captions == first.captions
    assert again.caption_image == first.caption_image
    assert _pixels(again) == _pixels(first)


def test_other_seed_gives_other_images(shifted_eval):
    other = shapes.make_split("shifted-eval", seed=1)
    same = sum(a == b for a, b in zip(_pixels(other), _pixels(shifted_eval), strict=True))
    assert same == 0


@pytest.mark.parametrize("name", ["pretrain", "shifted-train", "shifted-eval"])
def test_images_are_32px_rgb_and_every_caption_points_at_one(name, pretrain, shifted_train, shifted_eval):
    split = {"pretrain": pretrain, "shifted-train": shifted_train, "shifted-eval": shifted_eval}
    split = split[name]
    assert len(split.captions) == len(split.caption_image)
    assert all(0 <= i < len(split.images) for i in split.caption_image)
    assert {image.size for image in split.images} == {(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)}
    assert {image.mode for image in split.images} == {"RGB"}


def test_image_shows_the_background_colour_at_its_corner():
    scene = shapes.Scene("circle", "red", "blue", size_px=10, centre_x=16, centre_y=16, angle_deg=0)
    pixels = np.asarray(shapes.render(scene))
    assert tuple(pixels[0, 0]) == shapes.COLOURS["blue"]
    assert tuple(pixels[16, 16]) == shapes.COLOURS["red"]


def test_pretrain_captions_never_name_the_background(pretrain):
    keys = {shapes.content_key(caption) for caption in pretrain.captions}
    assert all(len(key) == 2 for key in keys)
    assert len(keys) == len(shapes.COLOURS) * len(shapes.SHAPES)


def test_shifted_captions_name_colour_shape_and_background(shifted_train, shifted_eval):
    for caption in shifted_train.captions + shifted_eval.captions:
        colour, shape, background = shapes.content_key(caption)
        assert colour != background and shape in shapes.SHAPES


def test_shifted_eval_holds_combinations_never_seen_in_shifted_train_of_any_seed(shifted_eval):
    eval_combos = {shapes.content_key(c) for c in shifted_eval.captions}
    for seed in (0, 1):
        train = shapes.make_split("shifted-train", seed=seed)
        assert not eval_combos & {shapes.content_key(c) for c in train.captions}


def test_shifted_eval_captions_are_unique_one_per_image(shifted_eval):
    assert 100 <= len(shifted_eval.captions) <= 200
    assert len(set(shifted_eval.captions)) == len(shifted_eval.captions)
    assert sorted(shifted_eval.caption_image) == list(range(len(shifted_eval.images)))


def test_shifted_train_sees_every_colour_and_every_shape_on_every_background():
    train_combos, _ = shapes.shifted_combinations()
    n = len(shapes.COLOURS)
    assert len({(colour, background) for colour, _, background in train_combos}) == n * (n - 1)
    assert len({(shape, background) for _, shape, background in train_combos}) == len(shapes.SHAPES) * n


def test_every_caption_word_is_in_the_vocabulary(pretrain, shifted_train, shifted_eval):
    vocabulary = set(shapes.vocabulary())
    for split in (pretrain, shifted_train, shifted_eval):
        assert {w for caption in split.captions for w in caption.split()} <= vocabulary
