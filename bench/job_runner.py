"""CPU cost of the one job runner per job, against streaming the same events by hand.

A fake engine yields the events of a short answer (queued, started, N deltas, done) at once; the
runner delivers each to two sinks that do nothing, as an IM job's topic and reply sinks would.
The bare loop iterates the same handle and awaits the same two sinks. The difference is what the
job pipeline (spec, live registry, terminal guarantee, budget release, end hook) costs per job.

    python bench/job_runner.py --jobs 20000 --deltas 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import quiet_logs
from bridge.jobs.runner import Busy, JobRunner, JobSpec
from engine.types import Delta, Done, JobEvent, JobRequest, Queued, Started, Usage


class _Handle:
    def __init__(self, request: JobRequest, deltas: int) -> None:
        self.job_id = request.job_id
        self._deltas = deltas

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(0)
        yield Started()
        for _ in range(self._deltas):
            yield Delta("x")
        yield Done("x" * self._deltas, Usage(1, self._deltas))

    def cancel(self) -> None:
        return None


class _Engine:
    def __init__(self, deltas: int) -> None:
        self.deltas = deltas

    def submit(self, request: JobRequest) -> _Handle:
        return _Handle(request, self.deltas)


class _Sink:
    required = False

    async def open(self) -> None:
        return None

    async def send(self, event: JobEvent) -> None:
        return None


async def measure(jobs: int, deltas: int) -> dict[str, float]:
    engine = _Engine(deltas)
    runner = JobRunner(engine)  # type: ignore[arg-type]
    ended: list[str] = []
    runner.on_end = lambda spec, outcome: ended.append(outcome)
    start = time.process_time()
    for i in range(jobs):
        spec = JobSpec(JobRequest(f"j{i}", b"x", "p"), "bench", "bench", (_Sink(), _Sink()))
        spec.busy = Busy.WAIT
        await runner.run(spec)
    runner_s = time.process_time() - start
    start = time.process_time()
    for i in range(jobs):
        handle = engine.submit(JobRequest(f"j{i}", b"x", "p"))
        sinks = (_Sink(), _Sink())
        async for event in handle.events():
            for sink in sinks:
                await sink.send(event)
    bare_s = time.process_time() - start
    assert len(ended) == jobs and set(ended) == {"done"}
    return {
        "jobs": jobs,
        "events_per_job": deltas + 3,
        "runner_us_per_job": round(runner_s / jobs * 1e6, 2),
        "bare_us_per_job": round(bare_s / jobs * 1e6, 2),
        "added_us_per_job": round((runner_s - bare_s) / jobs * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--deltas", type=int, default=16)
    args = parser.parse_args()
    quiet_logs()
    print(json.dumps(asyncio.run(measure(args.jobs, args.deltas)), indent=2))


if __name__ == "__main__":
    main()
