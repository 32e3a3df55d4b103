"""Model loading: where a model comes from, progress (shards, bytes, weights), cancel, abandon."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import engine.engine as engine_module
from engine import Engine, EngineConfig
from engine.loading import LoadCancelled, LoadProgress, ModelUnavailable, local_model_problem
from engine.model import Replica
from engine.tiny import ensure_tiny_model
from engine.types import EngineError

WAIT = 60.0


def test_local_model_problem_tells_missing_paths_from_hub_ids(tmp_path: Path) -> None:
    assert local_model_problem("tiny") is None
    assert local_model_problem("Qwen/Qwen2.5-VL-3B-Instruct") is None  # a hub id: decided later
    assert local_model_problem(str(ensure_tiny_model())) is None
    missing = local_model_problem("/nope/model")
    assert missing is not None and "no such model folder" in missing
    assert local_model_problem("./models/x") is not None
    assert local_model_problem("a/b/c") is not None  # not a hub id, so it must be a folder
    (tmp_path / "file.bin").write_bytes(b"x")
    assert "is a file" in str(local_model_problem(str(tmp_path / "file.bin")))
    assert "without config.json" in str(local_model_problem(str(tmp_path)))


def test_tiny_load_reports_its_one_shard_bytes_and_every_weight() -> None:
    progress = LoadProgress("tiny")
    with capture_logs() as logs:
        replica = Replica.load("tiny", "cpu", "float32", progress=progress)
    replica.close()
    shard = Path(ensure_tiny_model()) / "model.safetensors"
    snap = progress.snapshot()
    assert snap["shards"] == 1 and snap["checkpoint_bytes"] == shard.stat().st_size
    assert snap["weights_total"] > 0 and snap["weights_done"] == snap["weights_total"]
    assert "1 shard" in snap["text"] and snap["text"].startswith("loading model 'tiny': ")
    phases = [e["phase"] for e in logs if e["event"] == "engine.load_progress"]
    assert "loading processor" in phases and "loading weights" in phases


def test_a_multi_shard_checkpoint_counts_every_shard(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    tiny = Path(ensure_tiny_model())
    replica = Replica.load("tiny", "cpu", "float32")
    replica.model.save_pretrained(folder, max_shard_size="200KB")
    replica.close()
    for extra in tiny.iterdir():
        if extra.suffix != ".safetensors" and not (folder / extra.name).exists():
            shutil.copy(extra, folder / extra.name)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2, "the fake checkpoint should be sharded"
    progress = LoadProgress(str(folder))
    Replica.load(str(folder), "cpu", "float32", progress=progress).close()
    assert progress.shards == len(shards)
    assert progress.checkpoint_bytes == sum(p.stat().st_size for p in shards)
    assert progress.weights_done == progress.weights_total > 0
    assert f"{len(shards)} shards" in progress.describe()


def test_a_cancelled_progress_stops_the_load_at_its_next_step() -> None:
    progress = LoadProgress("tiny")
    progress.cancel()
    with pytest.raises(LoadCancelled):
        Replica.load("tiny", "cpu", "float32", progress=progress)


def test_a_missing_folder_is_model_unavailable() -> None:
    with pytest.raises(ModelUnavailable, match="no such model folder"):
        Replica.load("/nope/model", "cpu", "float32")


class GatedProgress(LoadProgress):
    """Stops the loading thread at its first weight until released (or cancelled)."""

    reached = threading.Event()
    release = threading.Event()
    honour_cancel = True

    def advance_weights(self, n: int) -> None:
        GatedProgress.reached.set()
        while not GatedProgress.release.wait(0.01):
            if self.honour_cancel and self.cancelled:
                break
        super().advance_weights(n)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[GatedProgress]]:
    GatedProgress.reached = threading.Event()
    GatedProgress.release = threading.Event()
    GatedProgress.honour_cancel = True
    monkeypatch.setattr(engine_module, "LoadProgress", GatedProgress)
    yield GatedProgress
    GatedProgress.release.set()


async def test_stop_during_the_load_cancels_it_cleanly(gated: type[GatedProgress]) -> None:
    engine = Engine(EngineConfig(model="tiny", device="cpu", warmup=False))
    start = asyncio.create_task(engine.start())
    assert await asyncio.to_thread(gated.reached.wait, WAIT)
    status = engine.status()
    assert not status.ready and status.loading is not None
    assert str(status.reason).startswith("loading model 'tiny': loading weights")
    await engine.stop(grace_s=WAIT)
    with pytest.raises(EngineError) as failed:
        await start
    assert failed.value.code == "cancelled"
    assert engine.load_abandoned is False


async def test_a_load_that_ignores_cancel_is_abandoned_after_the_grace(
    gated: type[GatedProgress],
) -> None:
    gated.honour_cancel = False
    engine = Engine(EngineConfig(model="tiny", device="cpu", warmup=False))
    start = asyncio.create_task(engine.start())
    assert await asyncio.to_thread(gated.reached.wait, WAIT)
    with capture_logs() as logs:
        await engine.stop(grace_s=0.2)
    assert engine.load_abandoned is True
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["engine.load_abandoned"]
    gated.release.set()  # let the thread finish; its late result is dropped
    with pytest.raises(EngineError):
        await asyncio.wait_for(start, WAIT)
