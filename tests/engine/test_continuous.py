"""Continuous batching: greedy answers equal one-job-at-a-time ``generate`` whatever joins when.

The reference for every job is the tiny model's own ``generate`` run on that job alone; the
continuous loop must reproduce it token for token with rows admitted mid-decode, different
``max_tokens`` and image sizes, and rows leaving early (cancel, timeout, out of memory).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine import Engine, EngineConfig, JobRequest
from engine.continuous import RunningBatch, cache_kwarg, choose_batching, continuous_support
from engine.images import ImageLimits, load_image
from engine.model import Replica, RowResult, RowSpec
from engine.types import Delta, Done, Failed
from tests.engine.conftest import WAIT, alone, collect, image

Factory = Callable[..., Coroutine[Any, Any, Engine]]
# Photos of very different sizes and aspect ratios, prompts of different lengths.
PHOTOS = ["chelsea.jpg", "panorama_3000x200.jpg", "one_pixel.png", "coffee_gray.png", "rocket.jpg"]
PROMPTS = ["Describe the image.", "Hi", "What is in this picture? " * 4, "Bonjour, 你好 ok", "x"]


def job(i: int, max_tokens: int, **kw: Any) -> JobRequest:
    """Job ``i`` over the sample photos and prompts."""
    return JobRequest(
        job_id=f"c{i}",
        image=image(PHOTOS[i % len(PHOTOS)]),
        prompt=f"{PROMPTS[i % len(PROMPTS)]} #{i}",
        max_tokens=max_tokens,
        **kw,
    )


@pytest.fixture(scope="module")
def replica(tiny_path: Path) -> Replica:
    """One tiny-model replica shared by the tests that drive the decode loop directly."""
    return Replica.load(str(tiny_path), "cpu", "float32")


def spec(replica: Replica, request: JobRequest) -> RowSpec:
    """The row the engine would build for ``request`` (same image preparation)."""
    limits = ImageLimits(
        max_pixels=50_000_000,
        pixel_budget=replica.pixel_budget,
        min_short_edge=replica.min_short_edge,
    )
    return RowSpec(load_image(request.image, limits), request.prompt, request.max_tokens or 24)


class Recorder:
    """Collects what a :class:`RunningBatch` streams, per row key."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.ends: dict[int, RowResult] = {}
        self.stop: set[int] = set()

    def batch(self, replica: Replica) -> RunningBatch:
        return RunningBatch(replica, self.on_text, self.on_end, lambda k: k in self.stop)

    def on_text(self, key: int, piece: str) -> None:
        assert key not in self.ends, "text after the row ended"
        self.texts[key] = self.texts.get(key, "") + piece

    def on_end(self, key: int, result: RowResult) -> None:
        assert key not in self.ends, "a row ended twice"
        self.ends[key] = result


def test_rows_admitted_mid_decode_match_generate_alone(replica: Replica) -> None:
    requests = [job(i, max_tokens=3 + 5 * i) for i in range(8)]
    rows = [spec(replica, r) for r in requests]
    reference = [alone(replica, row) for row in rows]
    rec = Recorder()
    batch = rec.batch(replica)
    fed = dict.fromkeys(range(len(rows)), 0)  # tokens fed back per row so far

    def step() -> None:
        for key in batch.keys:
            fed[key] += 1
        batch.step()
        # Position ids follow each row's own length, not the padded cache column.
        for key, position in batch.positions.items():
            assert position == reference[key][1].prompt_tokens + fed[key], key

    with torch.inference_mode():
        batch.admit([0, 1, 2], rows[0:3])  # three prompts of different lengths together
        step()
        step()
        batch.admit([3], rows[3:4])  # joins a running batch with a longer cache
        step()
        batch.admit([4, 5], rows[4:6])
        waiting = [6, 7]
        while len(batch) or waiting:
            if waiting and len(batch) < 4:
                key = waiting.pop(0)
                batch.admit([key], rows[key : key + 1])
            step()
    for key, (text, result) in enumerate(reference):
        assert rec.texts.get(key, "") == text, key
        assert rec.ends[key] == result, key
    assert batch.cache_length == 0  # every row left, and the cache with them


def test_row_stopped_midway_does_not_disturb_the_others(replica: Replica) -> None:
    rows = [spec(replica, job(i, max_tokens=14)) for i in range(3)]
    reference = [alone(replica, row) for row in rows]
    rec = Recorder()
    batch = rec.batch(replica)
    with torch.inference_mode():
        batch.admit([0, 1, 2], rows)
        for _ in range(3):
            batch.step()
        rec.stop.add(1)  # cancelled or timed out: polled at the next step
        batch.step()
        assert batch.keys == [0, 2] or 1 not in batch.keys
        while len(batch):
            batch.step()
    assert rec.ends[1].reason == "stopped" and rec.ends[1].completion_tokens == 4
    assert reference[1][0].startswith(rec.texts.get(1, ""))
    for key in (0, 2):
        assert (rec.texts.get(key, ""), rec.ends[key]) == reference[key]


def test_support_is_refused_for_per_call_rope_state(replica: Replica) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    assert continuous_support(replica.model, replica.generation_config) is None
    assert choose_batching("auto", replica) == ("continuous", None)
    assert choose_batching("static", replica) == ("static", None)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Qwen2_5_VLConfig(
        text_config={
            **small,
            "intermediate_size": 64,
            "num_key_value_heads": 1,
            "vocab_size": 128,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
        },
    )
    qwen = Qwen2_5_VLForConditionalGeneration(config)
    # Qwen-VL's rope state is carried per row (tests/engine/test_continuous_qwen.py) ...
    assert continuous_support(qwen, qwen.generation_config) is None
    # ... but a model keeping rope_deltas, or using mrope, without a get_rope_index is refused.
    for holder in (
        SimpleNamespace(config=qwen.config, rope_deltas=None),
        SimpleNamespace(config=qwen.config),
    ):
        reason = continuous_support(holder, qwen.generation_config)
        assert reason is not None and "rope" in reason
        stub: Any = SimpleNamespace(model=holder, generation_config=qwen.generation_config)
        mode, why = choose_batching("continuous", stub)
        assert mode == "static" and why == reason
    penalised = SimpleNamespace(repetition_penalty=1.05)
    assert "repetition_penalty" in str(continuous_support(replica.model, penalised))


def test_batching_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="batching"):
        EngineConfig(batching="dynamic")  # type: ignore[arg-type]


async def test_engine_answers_match_with_jobs_joining_mid_decode(
    make_engine: Factory, replica: Replica
) -> None:
    requests = [job(i, max_tokens=6 + 4 * i) for i in range(7)]
    reference = [alone(replica, spec(replica, r))[0] for r in requests]
    engine = await make_engine(
        batching="continuous", max_batch=4, batch_wait_ms=0, max_new_tokens=40, cache_ttl_s=0
    )
    first = engine.submit(requests[-1])  # the longest job starts alone
    events = first.events()
    async for event in events:
        if isinstance(event, Delta):
            break
    # The rest arrive while it decodes; more than max_batch, so some wait for a free row.
    handles = [engine.submit(r) for r in requests[:-1]]
    rest = [e async for e in events]
    results = await asyncio.gather(*(collect(h) for h in handles))
    done = rest[-1]
    assert isinstance(done, Done) and done.text == reference[-1]
    for req, result, expected in zip(requests, results, reference, strict=False):
        last = result[-1]
        assert isinstance(last, Done), (req.job_id, last)
        assert last.text == expected, req.job_id
        assert "".join(e.text for e in result if isinstance(e, Delta)) == last.text
    sizes = engine.status().batch_sizes
    assert sum(sizes.values()) >= 2 and max(sizes) <= 4  # several admissions, never > 4 rows
    assert engine.live_rows_per_step > 1.0  # rows really decoded side by side


async def test_cancel_and_timeout_of_one_row_leave_the_others_intact(
    make_engine: Factory, replica: Replica
) -> None:
    requests = [job(0, 60), job(1, 60, timeout_s=0.5), job(2, 30), job(3, 30)]
    reference = [alone(replica, spec(replica, r))[0] for r in requests[2:]]
    engine = await make_engine(
        batching="continuous", max_batch=4, batch_wait_ms=2000, max_new_tokens=60, cache_ttl_s=0
    )
    gate = threading.Event()
    steps: list[int] = []

    def hold(rows: int) -> None:
        steps.append(rows)
        if len(steps) == 3:  # mid-decode, wait until the short deadline has passed
            gate.wait(WAIT)

    engine.workers[0].replica.step_fault_hook = hold
    handles = [engine.submit(r) for r in requests]
    cancelled = handles[0].events()
    async for event in cancelled:
        if isinstance(event, Delta):
            handles[0].cancel()
            break
    tail = [e async for e in cancelled]
    assert isinstance(tail[-1], Failed) and tail[-1].code == "cancelled"
    expired = await collect(handles[1])
    assert isinstance(expired[-1], Failed) and expired[-1].code == "timeout"
    gate.set()
    for handle, expected in zip(handles[2:], reference, strict=True):
        last = (await collect(handle))[-1]
        assert isinstance(last, Done) and last.text == expected
    assert max(steps) == 4 and steps[-1] <= 2  # the two rows left the batch
    assert engine.status().workers[0].jobs_in_flight == 0


async def test_out_of_memory_in_a_decode_step_restarts_rows_without_repeating_text(
    make_engine: Factory, replica: Replica
) -> None:
    requests = [job(i, max_tokens=10 + i) for i in range(4)]
    reference = [alone(replica, spec(replica, r))[0] for r in requests]
    engine = await make_engine(
        batching="continuous", max_batch=4, batch_wait_ms=2000, cache_ttl_s=0
    )
    faults: list[int] = []

    def fault(rows: int) -> None:
        if rows == 4 and not faults:
            faults.append(rows)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.workers[0].replica.step_fault_hook = fault
    results = await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    assert faults == [4]
    for result, expected in zip(results, reference, strict=True):
        assert isinstance(result[-1], Done) and result[-1].text == expected
        assert "".join(e.text for e in result if isinstance(e, Delta)) == expected

    def always(rows: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.workers[0].replica.step_fault_hook = always
    alone_events = await collect(engine.submit(job(9, max_tokens=5)))
    assert isinstance(alone_events[-1], Failed) and alone_events[-1].code == "too_large"
    engine.workers[0].replica.step_fault_hook = None
    assert isinstance((await collect(engine.submit(job(8, max_tokens=5))))[-1], Done)


async def test_prefill_that_does_not_fit_beside_running_rows_waits_for_them(
    make_engine: Factory, replica: Replica
) -> None:
    requests = [job(0, max_tokens=30), job(1, max_tokens=8)]
    reference = [alone(replica, spec(replica, r))[0] for r in requests]
    engine = await make_engine(
        batching="continuous", max_batch=4, batch_wait_ms=0, max_new_tokens=30, cache_ttl_s=0
    )
    prefills: list[int] = []
    steps: list[int] = []
    queued = threading.Event()

    def fault(size: int) -> None:
        prefills.append(size)
        if len(prefills) == 2 and steps:  # the second job, beside the running first one
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def wait_for_second(rows: int) -> None:
        steps.append(rows)
        if len(steps) == 2:  # keep the first job running until the second is ready to join
            queued.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while not engine._batcher.ready and time.monotonic() < deadline:
                time.sleep(0.005)  # its image is decoding on another thread

    engine.workers[0].replica.fault_hook = fault
    engine.workers[0].replica.step_fault_hook = wait_for_second
    first = engine.submit(requests[0])
    events = first.events()
    async for event in events:
        if isinstance(event, Delta):
            break
    second = engine.submit(requests[1])
    queued.set()
    results = [[event, *[e async for e in events]], await collect(second)]
    for result, expected in zip(results, reference, strict=True):
        assert isinstance(result[-1], Done) and result[-1].text == expected
    assert prefills == [1, 1, 1]  # refused beside the first, admitted again once it ended
    assert max(steps) == 1  # never decoded together


def test_cache_goes_by_the_keyword_the_forward_declares(replica: Replica) -> None:
    class Current:
        def forward(self, input_ids: Any = None, cache: Any = None, **kwargs: Any) -> None: ...

    class Older:
        def forward(
            self, input_ids: Any = None, past_key_values: Any = None, **kw: Any
        ) -> None: ...

    assert cache_kwarg(Current()) == "cache"
    assert cache_kwarg(Older()) == "past_key_values"  # a ``cache=`` would vanish into **kwargs
    # The installed transformers: the real model's forward, whichever name it declares, with no
    # deprecation warning from a decode step (the suite turns that FutureWarning into an error).
    name = cache_kwarg(replica.model)
    assert name in inspect.signature(replica.model.forward).parameters
    rec = Recorder()
    batch = rec.batch(replica)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        batch.admit([0], [spec(replica, job(0, max_tokens=3))])
        batch.step()
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
