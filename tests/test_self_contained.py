"""The checkout carries what its tests and benchmarks use, and our own warnings fail the suite.

``.ci/run`` proves the first point for real (the suite in a fresh clone in an empty temporary
folder); this catches a path outside the checkout as soon as one is written.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest

from tests.conftest import DATA, IMAGES, ROOT

# Where data used to come from, spelled in pieces so this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            re.escape("../" + "shared"),
            re.escape("/work" + "/"),
            "BRIDGE_" + "SHARED_DATA",
            re.escape(".gpu" + "-data"),
        ]
    )
)
SKIPPED_DIRS = {".git", ".venv", "var", "artifacts", "node_modules"}
# This file, and CI, which unsets the old variable so that nothing can still lean on it.
EXEMPT = {Path(__file__).resolve(), ROOT / ".ci" / "run"}


def tracked_files() -> list[Path]:
    """The repository's files: git's list in a clone, else every file outside build folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts)
        ]


def test_no_file_points_outside_the_checkout() -> None:
    offenders = []
    for path in tracked_files():
        if path in EXEMPT or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binary data
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "references to data outside the checkout:\n" + "\n".join(offenders)


def test_the_sample_data_is_inside_the_checkout() -> None:
    assert DATA.resolve().is_relative_to(ROOT)
    assert sorted(p.name for p in IMAGES.glob("*.jpg"))
    assert sorted(p.name for p in (DATA / "feishu").glob("*.json"))


def test_a_warning_from_our_code_fails_the_test() -> None:
    # pyproject's filterwarnings turns warnings attributed to our packages into errors.
    with pytest.raises(UserWarning, match="ours"):
        warnings.warn("ours", UserWarning, stacklevel=1)
