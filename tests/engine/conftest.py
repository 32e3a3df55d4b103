"""Shared helpers for the engine tests: the tiny model, sample images, event collection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine import Engine, EngineConfig
from engine.job import Handle
from engine.model import Replica, RowResult, RowSpec
from engine.tiny import ensure_tiny_model
from engine.types import JobEvent
from tests.conftest import IMAGES

GOOD = [
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
    "one_pixel.png",
    "panorama_3000x200.jpg",
    "rocket.jpg",
    "rocket_exif_orientation6.jpg",
]
BAD = sorted(p.name for p in IMAGES.glob("bad_*"))
WAIT = 60.0  # generous bound for anything real to happen on a loaded 2-core machine


def alone(replica: Replica, row: RowSpec) -> tuple[str, RowResult]:
    """The continuous-batching reference: ``row`` through ``generate`` on its own."""
    pieces: list[str] = []
    ends: list[RowResult] = []
    replica.generate(
        [row],
        on_text=lambda i, t: pieces.append(t),
        on_end=lambda i, r: ends.append(r),
        should_stop=lambda i: False,
    )
    return "".join(pieces), ends[0]


def image(name: str) -> bytes:
    """The bytes of one sample image."""
    return (IMAGES / name).read_bytes()


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny model folder, built once."""
    return ensure_tiny_model()


async def collect(handle: Handle) -> list[JobEvent]:
    """All events of one job, bounded in time."""

    async def run() -> list[JobEvent]:
        return [event async for event in handle.events()]

    return await asyncio.wait_for(run(), WAIT)


def make_config(path: Path, **overrides: object) -> EngineConfig:
    """A CPU engine config on the tiny model with short waits."""
    values: dict[str, object] = {
        "model": str(path),
        "device": "cpu",
        "max_batch": 8,
        "batch_wait_ms": 20,
        "max_new_tokens": 24,
        "job_timeout_s": WAIT,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def batching() -> str:
    """The batching mode engines of a test get unless it says otherwise (modules override)."""
    return EngineConfig().batching


@pytest.fixture
async def make_engine(tiny_path: Path, batching: str) -> AsyncIterator[object]:
    """Factory for started engines; every one is stopped at the end of the test."""
    engines: list[Engine] = []

    async def factory(**overrides: object) -> Engine:
        overrides.setdefault("batching", batching)
        engine = Engine(make_config(tiny_path, **overrides))
        await engine.start()
        engines.append(engine)
        if overrides["batching"] in ("static", "continuous"):
            assert engine.batching == overrides["batching"]
        return engine

    yield factory
    for engine in engines:
        await engine.stop(grace_s=1.0)
