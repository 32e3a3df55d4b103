"""The load report: the weight formula, GPU memory per device (a fake CUDA query), its cache."""

from __future__ import annotations

import pytest

from engine.load import (
    MEMORY_COMFORT,
    MEMORY_FLOOR,
    DeviceMemory,
    LoadMonitor,
    load_weight,
    memory_headroom,
)
from engine.types import EngineStatus, WorkerStatus

GIB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCuda:
    """``torch.cuda.mem_get_info`` stand-in: free/total per device, counting calls."""

    def __init__(self, free: dict[str, int], total: int = 80 * GIB) -> None:
        self.free = free
        self.total = total
        self.calls = 0

    def __call__(self, device: str) -> tuple[int, int]:
        self.calls += 1
        if device not in self.free:
            raise RuntimeError(f"invalid device {device}")
        return self.free[device], self.total


def status(
    devices: tuple[str, ...] = ("cpu",),
    in_flight: tuple[int, ...] = (0,),
    queue: int = 0,
    capacity: int = 100,
    ready: bool = True,
) -> EngineStatus:
    workers = tuple(
        WorkerStatus(f"w{i}", d, True, n > 0, n, 0)
        for i, (d, n) in enumerate(zip(devices, in_flight, strict=True))
    )
    return EngineStatus(ready, "m", "float32", workers, queue, capacity)


def mem(free_share: float, total: int = 100 * GIB) -> DeviceMemory:
    free = int(total * free_share)
    return DeviceMemory(total - free, free, total)


def test_idle_is_100_and_not_ready_is_0() -> None:
    assert load_weight(True, 0, 8, 0, 256) == 100
    assert load_weight(False, 0, 8, 0, 256) == 0


@pytest.mark.parametrize(
    ("rows", "queued", "weight"),
    [(4, 0, 75), (8, 0, 50), (8, 128, 25), (8, 256, 0), (0, 256, 50), (12, 400, 0)],
)
def test_compute_headroom(rows: int, queued: int, weight: int) -> None:
    assert load_weight(True, rows, 8, queued, 256) == weight


def test_memory_headroom_is_flat_then_falls_to_zero() -> None:
    assert memory_headroom([]) == 1.0
    assert memory_headroom([mem(0.9), mem(MEMORY_COMFORT)]) == 1.0
    assert memory_headroom([mem(MEMORY_FLOOR)]) == 0.0
    assert memory_headroom([mem(0.01)]) == 0.0
    middle = (MEMORY_COMFORT + MEMORY_FLOOR) / 2
    assert memory_headroom([mem(0.9), mem(middle)]) == pytest.approx(0.5, abs=0.01)
    assert load_weight(True, 0, 8, 0, 256, [mem(middle)]) == 50
    assert load_weight(True, 8, 8, 0, 256, [mem(middle)]) == 25
    assert load_weight(True, 0, 8, 0, 256, [mem(0.04)]) == 0


def test_cpu_replicas_report_no_gpu_and_never_query_cuda() -> None:
    cuda = FakeCuda({})
    report = LoadMonitor(8, mem_info=cuda).report(status(in_flight=(3,), queue=10))
    assert cuda.calls == 0 and report.gpu == {}
    assert (report.live_rows, report.max_rows, report.queue_depth) == (3, 8, 10)
    assert report.weight == round(100 * (1 - (3 / 8 + 10 / 100) / 2))


def test_gpu_memory_per_device_and_the_worst_device_counts() -> None:
    cuda = FakeCuda({"cuda:0": 60 * GIB, "cuda:1": 8 * GIB})  # cuda:1 has 10% free
    monitor = LoadMonitor(4, mem_info=cuda, clock=Clock())
    report = monitor.report(status(("cuda:0", "cuda:1"), (2, 2)))
    assert report.gpu["cuda:0"] == DeviceMemory(20 * GIB, 60 * GIB, 80 * GIB)
    assert report.gpu["cuda:1"].free_bytes == 8 * GIB
    assert report.max_rows == 8 and report.live_rows == 4
    compute = 1 - (4 / 8) / 2
    assert report.weight == round(100 * compute * (0.10 - MEMORY_FLOOR) / 0.15)
    body = report.to_dict()
    assert body["gpu"]["cuda:1"] == {
        "used_bytes": 72 * GIB,
        "free_bytes": 8 * GIB,
        "total_bytes": 80 * GIB,
    }
    assert set(body) == {"weight", "queue_depth", "queue_capacity", "live_rows", "max_rows", "gpu"}


def test_readings_are_reused_for_a_second() -> None:
    clock = Clock()
    cuda = FakeCuda({"cuda:0": 40 * GIB})
    monitor = LoadMonitor(8, mem_info=cuda, clock=clock)
    first = monitor.report(status(("cuda:0",)))
    cuda.free["cuda:0"] = 2 * GIB
    clock.now += 0.5
    assert monitor.report(status(("cuda:0",))).gpu == first.gpu and cuda.calls == 1
    clock.now += 0.6
    later = monitor.report(status(("cuda:0",)))
    assert cuda.calls == 2 and later.gpu["cuda:0"].free_bytes == 2 * GIB and later.weight == 0


def test_a_device_that_cannot_be_queried_is_left_out() -> None:
    cuda = FakeCuda({"cuda:0": 40 * GIB})
    report = LoadMonitor(8, mem_info=cuda).report(status(("cuda:0", "cuda:7"), (0, 0)))
    assert set(report.gpu) == {"cuda:0"} and report.weight == 100


def test_not_ready_or_overridden_readiness_is_weight_0() -> None:
    monitor = LoadMonitor(8, mem_info=FakeCuda({}))
    assert monitor.report(status(ready=False)).weight == 0
    assert monitor.report(status(), ready=False).weight == 0
    assert monitor.report(status(ready=False), ready=True).weight == 100
