"""One way to turn any PIL picture into the RGB the image processor expects, used by the processor,
training, evaluation, `cvlm generate` and the Space alike, so that every path sees the same pixels.

- 16-bit and 32-bit greyscale (PNG `I;16`, `I`) and float (`F`) pictures are scaled to 8 bits, not
  clipped (clipping turns a 16-bit picture almost white);
- alpha (RGBA, LA, a palette's transparent colour) is composited on white, as transformers'
  `convert_to_rgb` does;
- CMYK, palette, greyscale and the rest are converted by Pillow.

Written with the image's own methods, so that this file imports nothing beyond the standard library.
"""

from __future__ import annotations

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa")


def _to_8bit(image):
    """A wide greyscale picture as 8-bit "L": 16-bit values divided by 257; wider ones scaled by their
    maximum; floats in [0, 1] multiplied by 255."""
    wide = image.convert("F")
    low, high = wide.getextrema()
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < high <= 65535):
        scale = 1 / 257
    elif image.mode == "F" and high <= 1.0:
        scale = 255.0
    elif high > 255:
        scale = 255.0 / high
    else:
        scale = 1.0
    return wide.point(lambda v: v * scale + 0.5).convert("L")  # + 0.5: rounded, not truncated


def to_rgb(image):
    """An RGB copy of a PIL image, whatever its mode (see the module's docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        return _to_8bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = rgba.convert("RGB").point(lambda _: 255)
        white.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return white
    return image.convert("RGB")
