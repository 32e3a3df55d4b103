"""Continuous batching on Qwen2.5-VL: per-row mrope positions match one-at-a-time ``generate``.

The model is a random-weight, shrunken Qwen2.5-VL (bench/engine_gpu.py's ``SHRUNK``). Images of
different sizes give each row a different rope delta, so a row decoding with another row's delta
(the model's batch-wide ``rope_deltas``) would drift from its reference.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
import torch
from PIL import Image

from engine import Done, Engine, JobRequest
from engine.continuous import (
    RunningBatch,
    backbone_of,
    choose_batching,
    continuous_support,
)
from engine.model import Replica, RowResult, RowSpec
from engine.mrope import mrope_positions
from tests.engine.conftest import alone, collect, make_config
from tests.engine.qwen_fixtures import build_qwen3_replica, build_qwen_replica

# (width, height) of each job's image and its prompt, in the tokenizer's word vocabulary.
SIZES = [(224, 224), (448, 224), (224, 336), (280, 280), (336, 224), (224, 448)]
PROMPTS = ["w5 w6", "w7", "w8 w9 w10 w11 w12 w13", "w14 w15 w16", "w17", "w18 w19 w20 w21"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Replica:
    """The shrunken Qwen2.5-VL replica, built once for this module."""
    return build_qwen_replica(tmp_path_factory.mktemp("qwen") / "model")


@pytest.fixture(scope="module")
def qwen3() -> Replica:
    """The shrunken Qwen3-VL replica (interleaved mrope, deepstack), built once."""
    return build_qwen3_replica()


def row(i: int, max_tokens: int) -> RowSpec:
    """Job ``i``: a flat-colour image of its own size and a prompt of its own length."""
    image = Image.new("RGB", SIZES[i % len(SIZES)], (40 * i % 256, 90, 200 - 20 * i))
    return RowSpec(image, PROMPTS[i % len(PROMPTS)], max_tokens)


def test_qwen_is_accepted_for_continuous_batching(qwen: Replica) -> None:
    assert continuous_support(qwen.model, qwen.generation_config) is None
    assert backbone_of(qwen.model) == "qwen2_5_vl_text"
    assert choose_batching("auto", qwen) == ("continuous", None)


def test_rows_have_their_own_rope_deltas(qwen: Replica) -> None:
    specs = [row(i, 4) for i in range(3)]
    inputs = qwen.encode([s.prompt for s in specs], [s.image for s in specs])
    mask = inputs["attention_mask"].long()
    positions, deltas = mrope_positions(qwen.model, inputs, mask)
    assert positions.shape == (3, 3, mask.shape[1])
    assert len(set(deltas.tolist())) == 3  # different image grids, different deltas
    # A row's last prompt token sits at its real length - 1 + its delta on every axis.
    for r in range(3):
        last = int(mask[r].sum()) - 1 + int(deltas[r])
        assert positions[:, r, -1].tolist() == [last] * 3


def test_rows_joining_at_different_steps_match_generate_alone(qwen: Replica) -> None:
    joining_matches_alone(qwen)


def test_qwen3_rows_joining_at_different_steps_match_generate_alone(qwen3: Replica) -> None:
    assert backbone_of(qwen3.model) == "qwen3_vl_text"
    assert choose_batching("auto", qwen3) == ("continuous", None)
    joining_matches_alone(qwen3)


def joining_matches_alone(qwen: Replica) -> None:
    """Six jobs joining a running batch at different steps answer as ``generate`` alone."""
    specs = [row(i, max_tokens=3 + 2 * i) for i in range(6)]
    reference = [alone(qwen, s) for s in specs]
    texts: dict[int, str] = {}
    ends: dict[int, RowResult] = {}

    def on_text(key: int, piece: str) -> None:
        texts[key] = texts.get(key, "") + piece

    def on_end(key: int, result: RowResult) -> None:
        assert key not in ends, "a row ended twice"
        ends[key] = result

    batch = RunningBatch(qwen, on_text, on_end, lambda key: False)
    with torch.inference_mode():
        batch.admit([0, 1], specs[0:2])  # two prompts of different lengths together
        batch.step()
        batch.admit([2], specs[2:3])  # joins after the model cached another prefill's deltas
        batch.step()
        batch.step()
        batch.admit([3, 4], specs[3:5])
        waiting = [5]
        while len(batch) or waiting:
            if waiting and len(batch) <= 2:
                key = waiting.pop(0)
                batch.admit([key], specs[key : key + 1])
            batch.step()
    assert len({text for text, _ in reference}) == len(reference)  # real, distinct answers
    for key, (text, result) in enumerate(reference):
        assert len(text.split()) == result.completion_tokens  # one word per token: no blanks
        assert (texts.get(key, ""), ends[key]) == (text, result), key
    assert batch.cache_length == 0


async def test_engine_runs_qwen_continuously_with_the_same_answers(
    qwen: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real engine (queue, scheduler, worker): continuous, and equal to alone."""
    specs = [row(i, max_tokens=4 + 2 * i) for i in range(5)]
    reference = [alone(qwen, s)[0] for s in specs]
    pngs = []
    for s in specs:
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        pngs.append(buf.getvalue())

    def load(cls: Any, *args: Any, **kwargs: Any) -> Replica:
        return qwen  # the Qwen processor itself cannot load here (no torchvision)

    monkeypatch.setattr(Replica, "load", classmethod(load))
    model = qwen.model
    engine = Engine(
        make_config(
            "qwen-shrunk",
            batching="auto",
            max_batch=3,
            batch_wait_ms=0,
            max_new_tokens=16,
            cache_ttl_s=0,
        )
    )
    await engine.start()
    try:
        assert engine.batching == "continuous"
        handles = [
            engine.submit(JobRequest(f"q{i}", pngs[i], s.prompt, max_tokens=s.max_tokens))
            for i, s in enumerate(specs)
        ]
        results = await asyncio.gather(*(collect(h) for h in handles))
    finally:
        await engine.stop()
        qwen.model = model  # stop() drops the replica's model; the module fixture keeps it
    for i, events in enumerate(results):
        last = events[-1]
        assert isinstance(last, Done), (i, last)
        assert last.text == reference[i], i
    assert engine.live_rows_per_step > 1.0  # rows really decoded side by side
