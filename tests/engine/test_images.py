"""Image intake: every sample photo decodes to bounded RGB; every hostile file is refused fast."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.images import ImageLimits, load_image, pixel_budget_of
from engine.types import EngineError
from tests.engine.conftest import BAD, GOOD, IMAGES, image

LIMITS = ImageLimits(max_pixels=50_000_000, pixel_budget=1024 * 1024)


def test_sample_set_is_complete() -> None:
    assert sorted(GOOD + BAD) == sorted(
        p.name for p in IMAGES.iterdir() if p.is_file() and not p.name.startswith(".")
    )


@pytest.mark.parametrize("name", GOOD)
def test_good_images_become_bounded_rgb(name: str) -> None:
    img = load_image(image(name), LIMITS)
    assert img.mode == "RGB"
    assert img.width * img.height <= LIMITS.pixel_budget * 1.01
    img.load()


@pytest.mark.parametrize("name", BAD)
def test_bad_images_refused_quickly_with_bounded_memory(name: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(EngineError) as info:
        load_image(image(name), LIMITS)
    assert time.perf_counter() - started < 2.0
    assert info.value.code == "bad_image" and info.value.message
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64


def test_exif_orientation_is_applied() -> None:
    raw = Image.open(IMAGES / "rocket_exif_orientation6.jpg")
    assert raw.size == (427, 640)
    assert load_image(image("rocket_exif_orientation6.jpg"), LIMITS).size == (640, 427)


def test_big_photo_downscaled_to_budget_and_short_edge_kept() -> None:
    img = load_image(image("coffee_4032x3024.jpg"), ImageLimits(pixel_budget=256 * 256))
    assert img.width * img.height <= 256 * 256 * 1.01
    assert abs(img.width / img.height - 4032 / 3024) < 0.02
    pano = load_image(
        image("panorama_3000x200.jpg"), ImageLimits(pixel_budget=64 * 64, min_short_edge=32)
    )
    assert pano.height == 32 and pano.width == 480


def _png(img: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", **kw)
    return out.getvalue()


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    data = _png(Image.fromarray(arr))
    img = load_image(data, LIMITS)
    assert img.mode == "RGB" and 120 <= img.getpixel((0, 0))[0] <= 136  # type: ignore[index]


def test_alpha_and_palette_transparency_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_png(rgba), LIMITS).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30])
    assert load_image(_png(pal, transparency=0), LIMITS).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert load_image(_png(la), LIMITS).getpixel((0, 0)) == (0, 0, 0)


def test_animated_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    r, g, _ = load_image(out.getvalue(), LIMITS).getpixel((0, 0))  # type: ignore[misc]
    assert r > 150 and g < 50


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_from_header_before_decoding() -> None:
    # Below Pillow's own bomb threshold, above ours: our limit must refuse it undecoded.
    data = _png_header_only(10_000, 6_000)
    started = time.perf_counter()
    with pytest.raises(EngineError) as info:
        load_image(data, ImageLimits(max_pixels=50_000_000))
    assert "limit" in info.value.message
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 10,
        b"GIF89a",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        b"%PDF-1.4\n",
    ],
)
def test_garbage_is_bad_image(data: bytes) -> None:
    """Also formats outside the allow-list: EPS would run Ghostscript."""
    with pytest.raises(EngineError) as info:
        load_image(data, LIMITS)
    assert info.value.code == "bad_image"


class _Size(dict[str, int]):
    pass


class _Proc:
    def __init__(self, size: dict[str, int], max_pixels: int | None = None) -> None:
        self.size = size
        if max_pixels is not None:
            self.max_pixels = max_pixels


def test_pixel_budget_of_processors() -> None:
    assert pixel_budget_of(_Proc({"shortest_edge": 32})) == (64 * 64, 32)
    assert pixel_budget_of(_Proc({"shortest_edge": 224})) == (448 * 448, 224)
    assert pixel_budget_of(_Proc({"longest_edge": 1003520, "shortest_edge": 3136})) == (1003520, 0)
    assert pixel_budget_of(_Proc({"height": 384, "width": 384})) == (768 * 768, 384)
    assert pixel_budget_of(_Proc({}, max_pixels=12845056)) == (12845056, 0)
    assert pixel_budget_of(None)[0] > 0


def test_formats_outside_the_allow_list_are_refused() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, format="PCX")  # Pillow could decode it
    with pytest.raises(EngineError) as info:
        load_image(out.getvalue(), LIMITS)
    assert info.value.code == "bad_image" and "supported format" in info.value.message


def _reference(data: bytes, limits: ImageLimits) -> Image.Image:
    """The plain pipeline (decode, rotate, convert, resize) that the fast paths must match."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    img.seek(0)
    w, h = img.size
    if img.format == "JPEG" and w * h > limits.pixel_budget:
        img.draft("RGB", _target(w, h, limits))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", img.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.convert("RGB")
    target = _target(img.width, img.height, limits)
    if target == img.size:
        return img
    return img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _target(w: int, h: int, limits: ImageLimits) -> tuple[int, int]:
    from engine.images import _target_size

    return _target_size(w, h, limits)


def _large_variants() -> dict[str, bytes]:
    big = Image.open(IMAGES / "coffee_4032x3024.jpg").convert("RGB").resize((1600, 1200))
    rgba = big.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(big.size))
    out: dict[str, bytes] = {}
    for name, img, fmt in (
        ("rgb.png", big, "PNG"),
        ("gray.png", big.convert("L"), "PNG"),
        ("rgba.png", rgba, "PNG"),
        ("rgb.webp", big, "WEBP"),
        ("cmyk.jpg", big.convert("CMYK"), "JPEG"),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize(
    "limits",
    [
        LIMITS,
        ImageLimits(pixel_budget=448 * 448, min_short_edge=224),
        ImageLimits(pixel_budget=4096, min_short_edge=32),
    ],
    ids=["1MP", "448", "tiny"],
)
def test_fast_paths_keep_the_size_and_nearly_the_pixels(limits: ImageLimits) -> None:
    """Resizing before converting and rotating gives the same size and at most a few levels of
    difference (RGB and grayscale: identical pixels)."""
    cases = {name: image(name) for name in GOOD} | _large_variants()
    for name, data in cases.items():
        fast, plain = load_image(data, limits), _reference(data, limits)
        assert fast.size == plain.size, name
        diff = np.abs(np.asarray(fast, np.int16) - np.asarray(plain, np.int16))
        exact = name.endswith(("rgb.png", "gray.png", "rgb.webp")) or name in (
            "astronaut.png",
            "coffee_gray.png",
            "coffee.jpg",
            "hubble.jpg",
        )
        assert int(diff.max()) <= (0 if exact else 6), (name, int(diff.max()))
        assert float(diff.mean()) < 0.6, name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_with_a_downscale(orientation: int) -> None:
    src = Image.new("RGB", (400, 200), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 100, 50))  # a red corner shows which way it turned
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    src.save(buf, format="PNG", exif=exif)
    limits = ImageLimits(pixel_budget=100 * 50)
    got = load_image(buf.getvalue(), limits)
    want = _reference(buf.getvalue(), limits)
    assert got.size == want.size == ((100, 50) if orientation < 5 else (50, 100))
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    # Rotating after the resize swaps the order of bicubic's two 8-bit passes: a few levels
    # apart at the hard red/blue edge, nowhere else.
    assert int(diff.max()) <= (0 if orientation < 5 else 12)
    assert float(diff.mean()) < 0.2


@pytest.mark.parametrize(
    "blob", [b"Exif\x00\x00garbage", b"MM\x00*\x00\x00\x00\x08\xff\xff", b"\x00"]
)
def test_a_broken_exif_block_keeps_the_image(blob: bytes) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buf, format="JPEG", exif=blob)
    img = load_image(buf.getvalue(), LIMITS)
    assert img.size == (40, 20) and img.mode == "RGB"
