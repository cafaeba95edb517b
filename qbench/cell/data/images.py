"""Any image file PIL opens -> the 8-bit RGB picture a person sees, or a clear refusal.

`Image.convert("RGB")` alone is wrong for several modes: it clips 16-bit grayscale (0..65535) at 255,
so a scan turns white; it drops transparency, leaving whatever colour the transparent pixels happen to
hold. Here:

- 8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr) convert as PIL converts them;
- 16-bit grayscale (I;16, I;16L, I;16B, I;16N, and mode I read from a PNG, which has no 32-bit
  pixels) is scaled to 8 bits, value / 257 rounded (65535 -> 255), not clipped;
- transparency (RGBA, LA, PA, RGBa, La, or a palette / grayscale / RGB image with a transparent
  colour) is composited onto white, as transformers' `convert_to_rgb` does for CLIP processors;
- an EXIF orientation tag is applied, so the picture is the way up its caption describes;
- 32-bit integer (I, other than from a PNG) and floating-point (F) pixels have no range the file
  states, and other colour spaces (LAB, HSV) need a colour profile: these are refused (`ImageModeError`)
  with the mode named, before any cell starts (the checks decode every image through `to_rgb`).
"""

from __future__ import annotations

from typing import Any

SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")


class ImageModeError(ValueError):
    """An image whose pixels qbench cannot turn into 8-bit RGB without guessing."""


def _sixteen_bit_to_l(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageModeError(f"mode {image.mode} image holds values {values.min()}..{values.max()}, outside 16 bits")
    return Image.fromarray(((values * 2 + 257) // 514).astype(np.uint8), mode="L")  # round(value / 257)


def to_rgb(image: Any) -> Any:
    """An 8-bit RGB PIL image of what `image` shows (see the module docstring); ImageModeError otherwise."""
    from PIL import Image, ImageOps

    from_png = image.format == "PNG"  # read before the transpose, whose copy has no format
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_GRAY or (mode == "I" and from_png):
        return _sixteen_bit_to_l(image).convert("RGB")
    if mode == "I":
        raise ImageModeError("32-bit integer pixels (mode I): the file does not say their range; save it as 8- or 16-bit")
    if mode == "F":
        raise ImageModeError("floating-point pixels (mode F): the file does not say their range; save it as 8- or 16-bit")
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and image.info.get("transparency") is not None):
        try:
            rgba = image.convert("RGBA")
        except ValueError as error:
            raise ImageModeError(f"mode {mode} cannot be read as RGBA ({error})") from None
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode in PLAIN_MODES:
        return image.convert("RGB")
    raise ImageModeError(f"mode {mode} (bands {', '.join(image.getbands())}) needs a colour profile to become RGB; save it as RGB")


def open_rgb(path: Any) -> Any:
    """Open an image file and return it as 8-bit RGB (`to_rgb`)."""
    from PIL import Image

    with Image.open(path) as opened:
        opened.load()
        return to_rgb(opened)
