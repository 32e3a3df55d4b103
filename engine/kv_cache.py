"""The KV-cache plumbing the continuous loop needs: the forward's cache keyword, each layer's
key/value states, and the left padding that lets rows of different lengths share one cache."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_kwarg(model: Any) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in current transformers.

    Transformers 5.x renamed ``past_key_values`` to ``cache`` and warns (``FutureWarning``) on
    the old name; older releases know only ``past_key_values`` and would silently drop a
    ``cache`` keyword into ``**kwargs``, so the name is read from the forward's signature.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def layer_states(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)``; the cache must hold only filled dynamic layers."""
    states = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise RuntimeError(
                f"unexpected cache layer {type(layer).__name__} for continuous batching"
            )
        states.append((layer.keys, layer.values))
    return states


def left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad ``[batch, heads, length, dim]`` key/value states on the left to ``width``."""
    missing = width - states.shape[2]
    if missing <= 0:
        return states
    pad = states.new_zeros((states.shape[0], states.shape[1], missing, states.shape[3]))
    return torch.cat([pad, states], dim=2)


def left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a ``[batch, length]`` attention mask with zeros on the left to ``width``."""
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
