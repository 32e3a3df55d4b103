"""The vision-feature cache: a second question about the same photo skips decoding and the vision
tower, and greedy answers are the same token for token with and without it, in both batching
modes; the cache is bounded (bytes, LRU, TTL), off where a model cannot take cached features,
and emptied on a hot swap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import structlog.testing
import torch
from PIL import Image

import engine.engine as engine_module
import engine.vision as vision_module
from bridge.dashboard.live import engine_status_dict
from engine import Engine, JobRequest
from engine.images import ImageLimits, load_image
from engine.model import Replica, RowSpec
from engine.types import Done
from engine.vision import VisionEncoder, VisionRef, probe, unsupported_reason
from engine.vision_cache import VisionCache, tensor_bytes, vision_key
from tests.engine.conftest import GOOD, collect, image

Factory = Callable[..., Coroutine[Any, Any, Engine]]
PROMPTS = ["Describe the image.", "What colour is it?", "How many are there? " * 3, "x"]


class Clock:
    """A fake monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feature(rows: int, fill: float = 0.0) -> torch.Tensor:
    """A ``[rows, 8]`` float32 feature tensor (32 bytes a row)."""
    return torch.full((rows, 8), fill)


# ------------------------------------------------------------------------------ the cache


def test_lru_by_bytes_ttl_and_counts() -> None:
    clock = Clock()
    lookups: list[bool] = []
    sizes: list[int] = []
    cache = VisionCache(
        3 * (32 * 10 + 300), 60.0, clock=clock, on_lookup=lookups.append, on_bytes=sizes.append
    )
    for name in "abc":
        cache.put(name, feature(10))
    assert len(cache) == 3
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", feature(10))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert (cache.hits, cache.misses) == (3, 1)
    assert lookups == [True, False, True, True]
    assert sizes[-1] == cache.size_bytes <= cache.max_bytes
    clock.now = 61.0
    assert cache.get("a") is None  # expired and dropped
    assert len(cache) == 2
    cache.put("huge", feature(10_000))  # larger than the whole bound: not kept
    assert cache.get("huge") is None
    cache.clear()
    assert (len(cache), cache.size_bytes, sizes[-1]) == (0, 0, 0)
    assert cache.snapshot()["hits"] == 3


def test_zero_bytes_is_off() -> None:
    cache = VisionCache(0, 60.0)
    cache.put("a", feature(1))
    assert not cache.enabled and cache.get("a") is None and cache.misses == 0


def test_key_separates_model_image_and_preprocessing() -> None:
    keys = {
        vision_key("m#1", b"img", "p"),
        vision_key("m#2", b"img", "p"),
        vision_key("m#1", b"img2", "p"),
        vision_key("m#1", b"img", "q"),
        vision_key("m#1i", b"mg", "p"),
    }
    assert len(keys) == 5
    assert tensor_bytes(feature(3)) == 96


# ---------------------------------------------------------------------------- the replica


@pytest.fixture(scope="module")
def replica(tiny_path: Path) -> Replica:
    """One tiny-model replica (no encoder attached: the processor path)."""
    return Replica.load(str(tiny_path), "cpu", "float32")


def limits_of(replica: Replica) -> ImageLimits:
    return ImageLimits(pixel_budget=replica.pixel_budget, min_short_edge=replica.min_short_edge)


def test_tiny_llava_qualifies(replica: Replica) -> None:
    assert unsupported_reason(replica.model, replica.processor) is None
    assert probe(VisionEncoder(replica, lambda t, k, f: None, "t")) is None


def test_probe_refuses_a_split_path_that_changes_ids_or_logits(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe is what keeps the cache off for models it would change the answers of."""
    wrong_count = VisionEncoder(replica, lambda t, k, f: None, "t")
    monkeypatch.setattr(
        wrong_count, "expand", lambda text, n: text.replace("<image>", "<image>" * (n + 1), 1)
    )
    assert "placeholders" in (probe(wrong_count) or "")
    skewed = VisionEncoder(replica, lambda t, k, f: None, "t")
    real = skewed.features
    monkeypatch.setattr(skewed, "features", lambda images: [f + 0.5 for f in real(images)])
    assert "differs" in (probe(skewed) or "")


def test_model_without_precomputed_features_is_refused(replica: Replica) -> None:
    class Plain:
        input_modalities = ("image", "text")

        def forward(self, input_ids: Any = None, pixel_values: Any = None) -> None: ...

    assert "mm_encoder_outputs" in (unsupported_reason(Plain(), replica.processor) or "")
    no_token = SimpleNamespace(image_processor=object())
    assert "placeholder" in (unsupported_reason(replica.model, no_token) or "")


def test_split_prefill_equals_processor_prefill(replica: Replica) -> None:
    """Same input ids and bit-identical logits from cached features as from the processor."""
    stored: dict[str, torch.Tensor] = {}
    encoder = VisionEncoder(replica, lambda t, k, f: stored.__setitem__(k, f), "t")
    limits = limits_of(replica)
    photos = [load_image(image(name), limits) for name in ("chelsea.jpg", "panorama_3000x200.jpg")]
    prompts = PROMPTS[:2]
    with torch.inference_mode():
        reference = replica.encode(prompts, photos)
        rows = [
            RowSpec(p, q, 4, VisionRef("t", f"k{i}"))
            for i, (p, q) in enumerate(zip(photos, prompts, strict=True))
        ]
        fresh = encoder.encode(rows, lambda r: r.image)  # misses: computes and stores
        assert set(stored) == {"k0", "k1"}
        cached_rows = [
            RowSpec(None, q, 4, VisionRef("t", k, stored[k]))
            for k, q in zip(stored, prompts, strict=True)
        ]
        cached = encoder.encode(cached_rows, lambda r: pytest.fail("a hit needs no image"))
        for inputs in (fresh, cached):
            assert torch.equal(inputs["input_ids"], reference["input_ids"])
            assert torch.equal(inputs["attention_mask"], reference["attention_mask"])
        want = replica.model(**reference).logits
        assert torch.equal(replica.model(**cached).logits, want)


def test_features_of_another_load_decode_the_image_again(replica: Replica) -> None:
    """After a hot swap a job may carry the old model's features: it is decoded once more."""
    stored: list[str] = []
    encoder = VisionEncoder(replica, lambda t, k, f: stored.append(k), "new")
    photo = load_image(image("rocket.jpg"), limits_of(replica))
    reloads: list[int] = []

    def reload() -> Image.Image:
        reloads.append(1)
        return photo

    stale = RowSpec(None, "hi", 4, VisionRef("old", "k", feature(4)), reload)
    with torch.inference_mode():
        replica.vision = encoder
        try:
            inputs = replica.encode_rows([stale])
        finally:
            replica.vision = None
        assert torch.equal(inputs["input_ids"], replica.encode(["hi"], [photo])["input_ids"])
    assert reloads == [1] and stored == []  # an old load's key is never refilled


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("mode", ["static", "continuous"])
async def test_greedy_answers_identical_with_and_without_cache(
    make_engine: Factory, mode: str
) -> None:
    """Each photo asked several questions, concurrently, so batches mix hits and misses."""
    photos = GOOD[:6]

    async def answers(engine: Engine) -> list[tuple[str, int, int]]:
        out = []
        for round_ in range(2):
            handles = [
                engine.submit(JobRequest(f"{round_}-{i}", image(p), PROMPTS[(i + round_) % 4], 12))
                for i, p in enumerate(photos * 2)
            ]
            for events in await asyncio.gather(*(collect(h) for h in handles)):
                done = events[-1]
                assert isinstance(done, Done), done
                out.append((done.text, done.usage.prompt_tokens, done.usage.completion_tokens))
        return out

    plain = await make_engine(batching=mode, cache_ttl_s=0, vision_cache_bytes=0, max_batch=4)
    cached = await make_engine(batching=mode, cache_ttl_s=0, max_batch=4)
    assert plain.status().vision_cache == {
        **plain.status().vision_cache,  # type: ignore[dict-item]
        "enabled": False,
    }
    want = await answers(plain)
    got = await answers(cached)
    assert got == want
    status = cached.status().vision_cache
    assert status is not None and status["enabled"] and status["reason"] is None
    assert status["entries"] == len(photos)
    assert status["hits"] >= 2 * len(photos)  # every job of round 2 hits


async def test_hit_skips_decoding(make_engine: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []

    def counting(data: bytes, limits: ImageLimits) -> Image.Image:
        decoded.append(len(data))
        return load_image(data, limits)

    monkeypatch.setattr(engine_module, "load_image", counting)
    engine = await make_engine(cache_ttl_s=0)
    photo = image("coffee_4032x3024.jpg")
    for i, prompt in enumerate(PROMPTS):
        assert isinstance(
            (await collect(engine.submit(JobRequest(f"q{i}", photo, prompt, 4))))[-1], Done
        )
    assert decoded == [len(photo)]  # only the first question decoded the photo
    assert engine.vision_cache.hits == len(PROMPTS) - 1


async def test_hot_swap_empties_the_cache(make_engine: Factory, tiny_path: Path) -> None:
    engine = await make_engine(cache_ttl_s=0)
    photo = image("chelsea.jpg")
    await collect(engine.submit(JobRequest("a", photo, "hi", 4)))
    assert len(engine.vision_cache) == 1
    await engine.swap_model(str(tiny_path))
    assert len(engine.vision_cache) == 0
    await collect(engine.submit(JobRequest("b", photo, "hi", 4)))
    status = engine.status().vision_cache
    assert status is not None and (status["entries"], status["hits"]) == (1, 0)


async def test_unsupported_model_turns_it_off_once(
    make_engine: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vision_module, "unsupported_reason", lambda m, p: "no precomputed features")
    with structlog.testing.capture_logs() as logs:
        engine = await make_engine(cache_ttl_s=0)
        photo = image("chelsea.jpg")
        for i in range(2):
            assert isinstance(
                (await collect(engine.submit(JobRequest(f"u{i}", photo, "hi", 4))))[-1], Done
            )
    said = [e for e in logs if e["event"] == "engine.vision_cache_off"]
    assert [e["reason"] for e in said] == ["no precomputed features"]
    status = engine.status().vision_cache
    assert status is not None
    assert (status["enabled"], status["reason"]) == (False, "no precomputed features")
    assert (status["entries"], status["hits"], status["misses"]) == (0, 0, 0)
    shown = engine_status_dict(engine.status())["vision_cache"]  # the dashboard's engine section
    assert (shown["enabled"], shown["reason"]) == (False, "no precomputed features")
