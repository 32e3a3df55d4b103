"""Decode time per sample image: ``engine.images.load_image`` now vs a baseline revision of it.

The baseline is the file at ``--baseline-rev`` (git), imported beside the current module, and the
two run alternately on the same bytes, so machine noise hits both alike. Besides the sample set,
large inputs are made from the 4032x3024 photo (PNG RGB, grayscale PNG, RGBA PNG, WebP, CMYK
JPEG), since the sample set has large JPEGs only. For each image and pixel budget it prints the
best of several timed runs of both (on a shared machine the least disturbed one), the output
size (which must be equal) and how far the pixels differ.

    python bench/image_decode.py [--baseline-rev a78f385] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import IMAGES  # noqa: E402
from engine import images as current  # noqa: E402

SAMPLES = [
    "astronaut.png",
    "astronaut_rgba.png",
    "chelsea.jpg",
    "chelsea.webp",
    "chelsea_cmyk.jpg",
    "coffee.jpg",
    "coffee_4032x3024.jpg",
    "coffee_gray.png",
    "frames.gif",
    "hubble.jpg",
    "panorama_3000x200.jpg",
    "rocket.jpg",
    "rocket_exif_orientation6.jpg",
]
#: (label, pixel budget, min short edge): the default, a fixed 448-pixel processor, the tiny model.
BUDGETS = [("1MP", 1024 * 1024, 0), ("448-edge", (2 * 448) ** 2 // 4, 224), ("tiny", 4096, 32)]


def baseline_module(rev: str) -> ModuleType:
    """``engine/images.py`` as of ``rev``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:engine/images.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-images-")) / "baseline_images.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_images", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_images"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def large_inputs() -> dict[str, bytes]:
    """Large non-JPEG (and CMYK) inputs made from the big sample photo."""
    big = Image.open(IMAGES / "coffee_4032x3024.jpg").convert("RGB")
    made: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw: object) -> None:
        out = io.BytesIO()
        img.save(out, format=fmt, **kw)
        made[name] = out.getvalue()

    save("big_4032x3024.png", big, "PNG", compress_level=6)
    save("big_gray_4032x3024.png", big.convert("L"), "PNG", compress_level=6)
    rgba = big.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(big.size))
    save("big_rgba_4032x3024.png", rgba, "PNG", compress_level=6)
    save("big_4032x3024.webp", big, "WEBP", quality=85)
    save("big_cmyk_4032x3024.jpg", big.convert("CMYK"), "JPEG", quality=90)
    return made


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared machine the least disturbed one."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="a78f385")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = baseline_module(args.baseline_rev)
    inputs = {name: (IMAGES / name).read_bytes() for name in SAMPLES}
    inputs.update(large_inputs())
    print(f"{'image':28} {'budget':9} {'in':>10} {'out':>10} {'base ms':>8} {'new ms':>8} "
          f"{'speed-up':>8} {'max diff':>8} {'mean diff':>9}")  # fmt: skip
    totals = {label: [0.0, 0.0] for label, _, _ in BUDGETS}
    for label, budget, short in BUDGETS:
        new_limits = current.ImageLimits(pixel_budget=budget, min_short_edge=short)
        old_limits = base.ImageLimits(pixel_budget=budget, min_short_edge=short)
        for name, data in inputs.items():
            new = current.load_image(data, new_limits)
            old = base.load_image(data, old_limits)
            assert new.size == old.size, (name, label, new.size, old.size)
            diff = np.abs(np.asarray(new, np.int16) - np.asarray(old, np.int16))
            olds, news = [], []
            for _ in range(3):  # alternate, so drift hits both
                olds.append(best_ms(partial(base.load_image, data, old_limits), args.repeats))
                news.append(best_ms(partial(current.load_image, data, new_limits), args.repeats))
            t_old, t_new = min(olds), min(news)
            totals[label][0] += t_old
            totals[label][1] += t_new
            size_in = "x".join(map(str, Image.open(io.BytesIO(data)).size))
            size_out = "x".join(map(str, new.size))
            print(
                f"{name:28} {label:9} {size_in:>10} {size_out:>10} {t_old:8.2f} {t_new:8.2f} "
                f"{t_old / t_new:7.2f}x {int(diff.max()):8d} {float(diff.mean()):9.3f}"
            )
    for label, (t_old, t_new) in totals.items():
        print(f"total {label}: baseline {t_old:.1f} ms, now {t_new:.1f} ms, {t_old / t_new:.2f}x")


if __name__ == "__main__":
    main()
