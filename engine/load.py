"""How loaded a replica is, for load balancers and operators: queue depth, rows running, GPU memory
per device, and one ``weight`` from 0 (send nothing) to 100 (idle).

The weight (:func:`load_weight`) is the product of two headrooms, so either one running out
brings it to 0:

* compute headroom ``1 - (rows/max_rows + queued/queue_capacity) / 2``: a replica whose batch
  slots are all busy but whose queue is empty scores 50 (new jobs wait for a slot); a full queue
  scores 0 (new jobs get ``busy``);
* memory headroom, from the device with the least free memory: 1 while at least
  :data:`MEMORY_COMFORT` of it is free, falling linearly to 0 at :data:`MEMORY_FLOOR` (a
  replica about to run out of memory on its next large batch should get no more work). CPU
  replicas report no devices and have memory headroom 1.

A replica that is not ready has weight 0. Pure functions and a small cache; the CUDA query is
injected, so all of it is tested on CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine.types import EngineStatus

#: Free share of GPU memory at and above which memory does not lower the weight.
MEMORY_COMFORT = 0.20
#: Free share of GPU memory at and below which the weight is 0.
MEMORY_FLOOR = 0.05
#: How long a GPU memory reading is reused (probes may come many times a second).
MEMORY_MAX_AGE_S = 1.0

#: ``(free_bytes, total_bytes)`` of one device, like ``torch.cuda.mem_get_info``.
MemInfo = Callable[[str], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Memory of one GPU as the driver reports it (all processes, not only ours)."""

    used_bytes: int
    free_bytes: int
    total_bytes: int

    @property
    def free_share(self) -> float:
        """Free memory as a share of the total (1.0 for a device reporting no total)."""
        return self.free_bytes / self.total_bytes if self.total_bytes > 0 else 1.0


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One replica's load at one moment (``/readyz`` ``load`` and the load metrics)."""

    weight: int
    queue_depth: int
    queue_capacity: int
    live_rows: int
    max_rows: int
    gpu: dict[str, DeviceMemory]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by ``/readyz``."""
        return {
            "weight": self.weight,
            "queue_depth": self.queue_depth,
            "queue_capacity": self.queue_capacity,
            "live_rows": self.live_rows,
            "max_rows": self.max_rows,
            "gpu": {
                device: {
                    "used_bytes": mem.used_bytes,
                    "free_bytes": mem.free_bytes,
                    "total_bytes": mem.total_bytes,
                }
                for device, mem in self.gpu.items()
            },
        }


def _share(part: int, whole: int) -> float:
    return min(1.0, max(0.0, part / whole)) if whole > 0 else 1.0


def memory_headroom(gpu: Iterable[DeviceMemory]) -> float:
    """1.0 with comfortable free memory on every device, down to 0.0 at the floor."""
    shares = [mem.free_share for mem in gpu]
    if not shares:
        return 1.0
    worst = min(shares)
    if worst >= MEMORY_COMFORT:
        return 1.0
    if worst <= MEMORY_FLOOR:
        return 0.0
    return (worst - MEMORY_FLOOR) / (MEMORY_COMFORT - MEMORY_FLOOR)


def load_weight(
    ready: bool,
    live_rows: int,
    max_rows: int,
    queue_depth: int,
    queue_capacity: int,
    gpu: Iterable[DeviceMemory] = (),
) -> int:
    """The balancing weight, 0-100 (see the module docstring for the formula)."""
    if not ready:
        return 0
    compute = 1.0 - (_share(live_rows, max_rows) + _share(queue_depth, queue_capacity)) / 2.0
    return round(100.0 * compute * memory_headroom(gpu))


def cuda_mem_info(device: str) -> tuple[int, int]:
    """``torch.cuda.mem_get_info`` for ``device`` (free and total bytes, all processes)."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


class LoadMonitor:
    """Builds :class:`LoadReport` from engine status; GPU readings are reused for a second.

    Args:
        max_batch: rows one worker runs at once (the engine's ``max_batch``).
        mem_info: the per-device memory query (tests inject a fake).
        clock: monotonic seconds (tests inject a fake).
    """

    def __init__(
        self,
        max_batch: int,
        mem_info: MemInfo = cuda_mem_info,
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = MEMORY_MAX_AGE_S,
    ) -> None:
        self.max_batch = max_batch
        self._mem_info = mem_info
        self._clock = clock
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._gpu: dict[str, DeviceMemory] = {}
        self._read_at: float | None = None
        self._devices: tuple[str, ...] = ()

    def _memory(self, devices: tuple[str, ...]) -> dict[str, DeviceMemory]:
        now = self._clock()
        with self._lock:
            fresh = self._read_at is not None and now - self._read_at < self._max_age_s
            if fresh and devices == self._devices:
                return self._gpu
            gpu = {}
            for device in devices:
                try:
                    free, total = self._mem_info(device)
                except Exception:  # a device that cannot be queried is left out, not fatal
                    continue
                gpu[device] = DeviceMemory(max(0, total - free), free, total)
            self._gpu, self._read_at, self._devices = gpu, now, devices
            return gpu

    def report(self, status: EngineStatus, ready: bool | None = None) -> LoadReport:
        """The load of the engine whose status is ``status``; ``ready`` overrides the engine's
        own readiness (a replica whose store is down takes no traffic either)."""
        devices = tuple(sorted({w.device for w in status.workers if w.device.startswith("cuda")}))
        gpu = self._memory(devices) if devices else {}
        live_rows = sum(w.jobs_in_flight for w in status.workers if w.alive)
        max_rows = self.max_batch * max(1, sum(1 for w in status.workers if w.alive))
        weight = load_weight(
            status.ready if ready is None else ready,
            live_rows,
            max_rows,
            status.queue_depth,
            status.queue_capacity,
            gpu.values(),
        )
        return LoadReport(
            weight, status.queue_depth, status.queue_capacity, live_rows, max_rows, gpu
        )
