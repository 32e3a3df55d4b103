"""The values a batch is made of and ends with: one row's inputs (:class:`RowSpec`), how a row
ended (:class:`RowResult`), how well a generate call used its slots (:class:`StepUsage`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from engine.vision import VisionRef

if TYPE_CHECKING:
    from engine.job import Job


@dataclass(slots=True)
class RowResult:
    """How one row of a batch ended."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class StepUsage:
    """How well one generate call used its decode slots.

    ``active_row_steps / (steps * rows)`` is the share of computed row-steps that produced a
    token for a live row; the rest is padding for rows that already ended, the waste continuous
    batching would reclaim.
    """

    steps: int
    active_row_steps: int
    rows: int


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One row's inputs for :meth:`Replica.generate`.

    ``image`` may be None when ``vision`` carries cached features; ``reload`` then decodes the
    image again for a replica that cannot use them (another model after a hot swap).
    """

    image: Image.Image | None
    prompt: str
    max_tokens: int
    vision: VisionRef | None = None
    reload: Callable[[], Image.Image] | None = None


def spec_of(job: Job) -> RowSpec:
    """A job's row: its decoded image, or the cached features of it and a way to decode it."""
    return RowSpec(job.image, job.request.prompt, job.max_tokens, job.vision, job.reload)


def row_image(row: RowSpec) -> Image.Image:
    """The row's decoded image, decoding it again when only cached features came with it."""
    if row.image is not None:
        return row.image
    if row.reload is None:
        raise RuntimeError("a row without an image has no way to decode it")
    return row.reload()
