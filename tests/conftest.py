"""Shared test set-up: an isolated cache for the tiny model and a scaled time unit."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The photos, hostile images and Feishu wire samples the tests use, carried in the repository.
DATA = ROOT / "tests" / "data"
IMAGES = DATA / "images"

# Build the tiny model once per checkout, never in the user's home cache.
os.environ.setdefault("BRIDGE_CACHE_DIR", str(ROOT / "var" / "test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One scaled time unit for functional tests (websockets' MS): slow machines set BRIDGE_TEST_UNIT.
UNIT = float(os.environ.get("BRIDGE_TEST_UNIT", "1.0"))
