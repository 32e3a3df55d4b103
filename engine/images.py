"""Turn untrusted image bytes into a bounded RGB picture, or refuse them with ``bad_image``.

Runs on decode threads, never on the event loop. The pixel limit is checked from the header
before any pixel is decoded, so a decompression bomb costs a few kilobytes, not gigabytes.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.types import EngineError

DEFAULT_PIXEL_BUDGET = 1024 * 1024
# Formats a chat photo can come in. Others (EPS runs Ghostscript, PDF, PSD, ...) are refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes Pillow resamples directly (alpha modes are premultiplied inside resize and reduce).
_RESAMPLE_MODES = ("RGB", "L", "RGBA", "LA", "CMYK", "RGBX")
#: ``reduce`` (a box filter) shrinks by whole factors while at least this many times the target
#: remain; bicubic does the rest. 3.0 is Pillow's "indistinguishable from fair resampling"; 2.0
#: was barely faster and differed by up to 42 levels at the tiny model's 64x64 budget.
REDUCE_GAP = 3.0


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an accepted image may be.

    Attributes:
        max_pixels: header width x height above this is refused before decoding.
        pixel_budget: accepted images larger than this are downscaled to about this many pixels.
        min_short_edge: downscaling never takes the short edge below this (the model's input size).
    """

    max_pixels: int = 50_000_000
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    min_short_edge: int = 0


def bad_image(message: str) -> EngineError:
    """The error every refused image raises."""
    return EngineError("bad_image", message)


def load_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode ``data`` into an RGB image no larger than the pixel budget.

    EXIF orientation is applied; CMYK, grayscale, palette, alpha, 16-bit and animated images
    (first frame) become plain RGB.

    Args:
        data: the encoded image as received.
        limits: the pixel limit and budget.

    Returns:
        A fully loaded RGB image.

    Raises:
        EngineError: code ``bad_image`` for empty, unknown, truncated, oversized or corrupt data.
    """
    if not data:
        raise bad_image("image is empty")
    try:
        with warnings.catch_warnings():
            # Our own limit replaces Pillow's global bomb check; its warning must not leak out.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        names = ", ".join(ALLOWED_FORMATS)
        raise bad_image(f"data is not an image in a supported format ({names})") from None
    except Image.DecompressionBombError:
        raise bad_image("image has too many pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_image(f"cannot read image header: {exc}") from None
    try:
        return _decode(img, limits)
    finally:
        img.close()


def _decode(img: Image.Image, limits: ImageLimits) -> Image.Image:
    width, height = img.size
    if width < 1 or height < 1:
        raise bad_image("image has no pixels")
    if width * height > limits.max_pixels:
        raise bad_image(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    fmt = img.format or "unknown"
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        # The target is symmetric in width and height, so it is computed on the stored
        # orientation; the EXIF rotation is applied last, to the small image (less to move).
        target = _target_size(width, height, limits)
        orientation = _orientation(img)
        if target != (width, height) and fmt == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: less memory and time for big photos.
            img.draft("RGB", target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        # After a draft the target is taken from the decoded size again (as it always was),
        # so an image's preprocessed size does not depend on which path decoded it.
        small = _shrink(_resizable(img), _target_size(img.width, img.height, limits))
        rgb = _orient(_to_rgb(small), orientation)
        if rgb is img:  # nothing made a new image: detach it from the file the caller closes
            rgb = img.copy()
    except EngineError:
        raise
    except Image.DecompressionBombError:
        raise bad_image("image has too many pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise bad_image(f"corrupt or truncated {fmt} image: {exc}") from None
    except MemoryError:
        raise bad_image("image is too large to decode") from None
    return rgb


def _target_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """The size an image is brought to: within the budget, short edge kept >= min_short_edge."""
    pixels = width * height
    if pixels <= limits.pixel_budget:
        return width, height
    scale = math.sqrt(limits.pixel_budget / pixels)
    short = min(width, height)
    if limits.min_short_edge and short * scale < limits.min_short_edge:
        scale = limits.min_short_edge / short
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: a broken EXIF block costs the
    rotation, not the image)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    """Turn ``img`` upright as its EXIF orientation says (what ``ImageOps.exif_transpose`` does)."""
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _resizable(img: Image.Image) -> Image.Image:
    """``img`` in a mode that resamples correctly, kept as small as possible (L stays L, CMYK
    and alpha stay until after the resize, which premultiplies alpha itself)."""
    mode = img.mode
    if mode in _RESAMPLE_MODES:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_to_rgb(img)
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode in ("PA", "RGBa", "La"):
        return img.convert("RGBA")
    return img.convert("RGB")


def _shrink(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Bring ``img`` to ``target``: Pillow first ``reduce``s by the whole factor that leaves at
    least :data:`REDUCE_GAP` times the target (a cheap box filter, with the box kept exact for
    sizes the factor does not divide), then resamples the rest bicubically."""
    if target == img.size:
        return img
    return img.resize(target, Image.Resampling.BICUBIC, reducing_gap=REDUCE_GAP)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_to_rgb(img)
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale: rescale to 8 bits instead of clipping at 255."""
    arr: np.ndarray[Any, Any] = np.asarray(img, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if peak > 255.0:
        arr = arr * (255.0 / (65535.0 if peak <= 65535.0 else peak))
    gray = np.clip(arr, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def pixel_budget_of(image_processor: object) -> tuple[int, int]:
    """Read ``(pixel_budget, min_short_edge)`` from a Hugging Face image processor.

    Processors state their input size differently (a pixel count, an edge, a fixed height and
    width); this maps each to the number of pixels worth keeping before the processor resizes.
    """
    size: Any = getattr(image_processor, "size", None)

    def get(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if isinstance(value, int | float) and value else None

    attr = getattr(image_processor, "max_pixels", None)
    if isinstance(attr, int) and attr > 0:
        return attr, 0
    max_px = get("max_pixels")
    if max_px:
        return max_px, 0
    longest = get("longest_edge")
    if longest:
        # Some processors (Qwen-VL) store a pixel count under ``longest_edge``.
        return (longest, 0) if longest > 16384 else (longest * longest, 0)
    shortest = get("shortest_edge")
    height, width = get("height"), get("width")
    edge = shortest or max(height or 0, width or 0)
    if edge:
        # Fixed-size inputs: keep twice the edge so resampling in the processor stays good.
        return max((2 * edge) ** 2, 64 * 64), edge
    return DEFAULT_PIXEL_BUDGET, 0
