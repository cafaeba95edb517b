"""Every image mode PIL opens becomes the 8-bit RGB picture a person sees, or is refused before any cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qbench.cell.data.pairs import open_image
from qbench.cell.data.tsv import load_tsv


def pixels(path_or_image) -> np.ndarray:
    return np.asarray(open_image(path_or_image))


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"  # what PIL makes of it: the case's input
    seen = pixels(path)
    assert seen.shape == (2, 4, 3) and seen.dtype == np.uint8
    expected = np.round(values / 257).astype(np.uint8)
    assert (seen == expected[..., None]).all()
    assert (seen == 255).mean() < 0.2  # the old conversion made 7 of 8 pixels pure white


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_every_16_bit_grayscale_layout_is_scaled(mode: str, dtype: str):
    image = Image.frombytes(mode, (3, 1), np.array([[0, 65535, 25700]], dtype=dtype).tobytes())
    assert pixels(image)[..., 0].tolist() == [[0, 255, 100]]


def test_transparency_is_composited_onto_white_as_transformers_does():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert pixels(rgba).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    la = Image.new("LA", (1, 1), (0, 128))  # black at half opacity
    assert pixels(la).tolist() == [[[127, 127, 127]]]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert pixels(palette).tolist() == [[[255, 255, 255], [200, 10, 10]]]


@pytest.mark.parametrize(("mode", "value", "rgb"), [("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("CMYK", (0, 255, 255, 0), (255, 0, 0))])
def test_plain_modes_convert_as_pil_converts_them(mode: str, value, rgb):
    assert tuple(pixels(Image.new(mode, (1, 1), value))[0, 0]) == rgb


def test_the_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    image.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    assert pixels(path).shape == (4, 2, 3)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (Image.fromarray(np.array([[0.5]], dtype=np.float32)), "floating-point pixels (mode F)"),
        (Image.fromarray(np.array([[70000]], dtype=np.int32)), "32-bit integer pixels (mode I)"),
        (Image.new("HSV", (1, 1)), "mode HSV"),
    ],
)
def test_modes_without_a_stated_range_are_refused(image, reason: str):
    from qbench.cell.data.images import ImageModeError

    with pytest.raises(ImageModeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        open_image(image)


def test_the_checks_before_a_run_name_the_line_of_an_image_qbench_refuses(tmp_path: Path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "fine.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(root / "float.tiff")
    Image.fromarray(np.full((4, 4), 60000, dtype=np.uint16)).save(root / "gray16.png")
    annotation = tmp_path / "a.tsv"
    annotation.write_text("fine.png\tone\nfloat.tiff\ttwo\ngray16.png\tthree\n", encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_tsv(annotation, root, decode_images=True)
    (problem,) = str(caught.value).split("\n")
    assert problem.startswith(f"{annotation}:2: image 'float.tiff' is unreadable (ImageModeError: floating-point pixels")
