"""Multimodal rope (mrope) positions per row, for decode loops that mix rows across prefills.

Qwen2/2.5/3-VL place image tokens on a 3-D (temporal, height, width) grid of rope positions.
``generate`` computes them once per batch and keeps the per-row offset (``rope_deltas``) on the
model; a loop whose rows come from different prefills computes and keeps them itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


def rope_index_of(model: Any) -> Callable[..., Any] | None:
    """The model's ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), or ``None``."""
    for holder in (getattr(model, "model", None), model):
        index = getattr(holder, "get_rope_index", None) if holder is not None else None
        if callable(index):
            return index  # type: ignore[no-any-return]
    return None


def mrope_positions(
    model: Any, inputs: Any, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill positions ``(3, rows, length)`` and each row's rope delta ``(rows,)`` for mrope.

    The delta is what a row's decode positions add to its real length (for an image, fewer
    position ids than tokens). ``mm_token_type_ids`` is rebuilt from the placeholder ids when
    the processor did not return it (older processors), as the model itself would need it.
    """
    index = rope_index_of(model)
    assert index is not None
    input_ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = torch.zeros_like(input_ids, dtype=torch.int)
        for kind, attr in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(model.config, attr, None)
            if token is not None:
                types = types.masked_fill(input_ids == token, kind)
    offered = {
        "mm_token_type_ids": types,
        "image_grid_thw": inputs.get("image_grid_thw"),
        "video_grid_thw": inputs.get("video_grid_thw"),
        "second_per_grid_ts": inputs.get("second_per_grid_ts"),
        "attention_mask": mask,
    }
    params = inspect.signature(index).parameters
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    positions, deltas = index(input_ids, **kwargs)
    return positions, deltas.reshape(-1).to(device=mask.device, dtype=torch.long)
