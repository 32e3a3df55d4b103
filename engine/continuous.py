"""Continuous batching: a decode loop that admits new rows between steps of a running batch.

``generate`` runs a fixed batch to its end, so a job that arrives meanwhile waits for the
slowest row. :class:`RunningBatch` instead keeps one KV cache for the rows now decoding, steps
them one token at a time, drops finished rows at once and merges newly prefilled rows in between
steps. Rows of different lengths share the cache by left padding: the 2-D attention mask hides
the padding and every row carries its own position ids, exactly as ``generate`` does for a
left-padded batch, so greedy answers do not depend on when a row joined.

It is architecture-neutral for models whose forward takes plain 1-D position ids and whose cache
is a stack of ordinary ``DynamicLayer`` s. Qwen-VL's multimodal rope (mrope) is carried per row:
each row's 3-D positions and its rope delta come from the model's ``get_rope_index`` at the row's
own prefill, and every decode step passes explicit ``(3, rows, 1)`` positions (the row's real
length plus its delta), so the model's batch-wide ``rope_deltas`` attribute is never relied on.
:func:`~engine.batching_mode.continuous_support` says whether a model qualifies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from engine.batching_mode import (
    KNOWN_GOOD_BACKBONES,
    backbone_of,
    choose_batching,
    continuous_support,
)
from engine.kv_cache import cache_kwarg, layer_states, left_pad, left_pad_mask
from engine.model import Replica
from engine.mrope import mrope_positions, rope_index_of
from engine.rows import RowResult, RowSpec
from engine.streamer import RowDecoder

#: Which models may run this loop lives in engine.batching_mode; re-exported here.
__all__ = [
    "KNOWN_GOOD_BACKBONES",
    "RunningBatch",
    "backbone_of",
    "cache_kwarg",
    "choose_batching",
    "continuous_support",
    "warmup_continuous",
]


@dataclass(slots=True)
class _Row:
    """One live row: its key, limits and incremental decoder."""

    key: int
    max_tokens: int
    prompt_tokens: int
    decoder: RowDecoder
    produced: int = 0
    text: list[str] = field(default_factory=list)


class RunningBatch:
    """The rows decoding together on one replica, their shared KV cache and per-row positions.

    Callbacks fire on the calling (worker) thread and mirror :class:`~engine.streamer.
    BatchStreamer`: ``on_text(key, piece)`` with each new piece of a row's answer and
    ``on_end(key, result)`` once per row (reason ``eos``, ``length`` or ``stopped``);
    ``should_stop(key)`` is polled for every row at every step. Not thread-safe: one worker
    thread owns it, under the replica's lock.
    """

    def __init__(
        self,
        replica: Replica,
        on_text: Callable[[int, str], None],
        on_end: Callable[[int, RowResult], None],
        should_stop: Callable[[int], bool],
    ) -> None:
        self._replica = replica
        self._on_text = on_text
        self._on_end = on_end
        self._should_stop = should_stop
        self._cache_kwarg = cache_kwarg(replica.model)
        self._mrope = rope_index_of(replica.model) is not None
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token
        self._positions: torch.Tensor | None = None  # [rows], position of the next input
        self._deltas: torch.Tensor | None = None  # [rows], mrope delta added to positions
        self._next: torch.Tensor | None = None  # [rows], the token to feed at the next step
        self.steps = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def keys(self) -> list[int]:
        """The keys of the live rows, in batch order."""
        return [row.key for row in self._rows]

    @property
    def positions(self) -> dict[int, int]:
        """Each live row's position id for its next input token (its real length so far)."""
        if self._positions is None:
            return {}
        return dict(zip(self.keys, (int(p) for p in self._positions.tolist()), strict=True))

    @property
    def cache_length(self) -> int:
        """Columns in the shared KV cache (the longest row plus left padding)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def clear(self) -> None:
        """Drop every row and the cache without ending rows (after an out-of-memory error)."""
        self._rows = []
        self._cache = None
        self._mask = self._positions = self._next = self._deltas = None

    def admit(self, keys: Sequence[int], specs: Sequence[RowSpec]) -> None:
        """Prefill ``specs`` (images through the processor and the model) and merge them in.

        The first token of every new row comes from its prefill and is streamed at once. The
        running rows are untouched if this raises (e.g. ``torch.OutOfMemoryError``).
        """
        replica = self._replica
        if replica.fault_hook is not None:
            replica.fault_hook(len(specs))
        inputs = replica.encode_rows(specs)
        mask = inputs["attention_mask"].long()
        # As generate does for a left-padded batch: count real tokens, padding at position 0.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        deltas = torch.zeros_like(positions[:, 0])
        prefill_positions = positions
        if self._mrope:
            prefill_positions, deltas = mrope_positions(replica.model, inputs, mask)
        cache = DynamicCache()
        out = replica.model(
            **inputs,
            **{self._cache_kwarg: cache},
            position_ids=prefill_positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1, :].argmax(dim=-1)
        del out
        self._merge(cache, mask, positions[:, -1] + 1, deltas, first)
        prompt_tokens = [int(n) for n in mask.sum(dim=1).tolist()]
        new_rows = [
            _Row(key, spec.max_tokens, count, RowDecoder(replica.decode))
            for key, spec, count in zip(keys, specs, prompt_tokens, strict=True)
        ]
        self._rows.extend(new_rows)
        self._consume(first.tolist(), start=len(self._rows) - len(new_rows))

    def step(self) -> None:
        """One decode step for every live row; finished rows leave the batch at once."""
        if not self._rows:
            return
        assert self._cache is not None and self._mask is not None
        assert self._positions is not None and self._next is not None
        assert self._deltas is not None
        replica = self._replica
        if replica.step_fault_hook is not None:
            replica.step_fault_hook(len(self._rows))
        ones = torch.ones_like(self._mask[:, :1])
        mask = torch.cat([self._mask, ones], dim=1)
        step_positions = self._positions[:, None]
        if self._mrope:
            # Explicit per-row positions: the model's cached rope_deltas belong to the last
            # prefill only, not to the rows decoding now.
            step_positions = (step_positions + self._deltas[:, None])[None].expand(3, -1, -1)
        out = replica.model(
            input_ids=self._next[:, None],
            attention_mask=mask,
            position_ids=step_positions,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
            logits_to_keep=1,
        )
        tokens = out.logits[:, -1, :].argmax(dim=-1)
        del out
        self._mask = mask
        self._positions = self._positions + 1
        self._next = tokens
        self.steps += 1
        self._consume(tokens.tolist(), start=0)

    def stop_requested(self) -> None:
        """End rows whose job asks to stop (cancelled, timed out) without another step."""
        ended = [i for i, row in enumerate(self._rows) if self._should_stop(row.key)]
        for i in ended:
            row = self._rows[i]
            self._on_end(row.key, RowResult("stopped", row.prompt_tokens, row.produced))
        self._drop(ended)

    # ---------------------------------------------------------------------------- internals

    def _consume(self, tokens: list[int], start: int) -> None:
        """Feed rows ``start..`` their new token, end the finished ones and drop them."""
        eos = self._replica.eos_ids
        ended: list[int] = []
        for i in range(start, len(self._rows)):
            row = self._rows[i]
            token = tokens[i - start]
            if self._should_stop(row.key):
                ended.append(i)
                self._on_end(row.key, RowResult("stopped", row.prompt_tokens, row.produced))
                continue
            row.produced += 1
            reason = ""
            if token in eos:
                reason = "eos"
            else:
                piece = row.decoder.push(token)
                if piece:
                    row.text.append(piece)
                    self._on_text(row.key, piece)
                if row.produced >= row.max_tokens:
                    reason = "length"
            if reason:
                rest = row.decoder.flush()
                if rest:
                    row.text.append(rest)
                    self._on_text(row.key, rest)
                ended.append(i)
                self._on_end(row.key, RowResult(reason, row.prompt_tokens, row.produced))
        self._drop(ended)

    def _merge(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        deltas: torch.Tensor,
        first: torch.Tensor,
    ) -> None:
        """Append prefilled rows to the running batch, left-padding whichever side is shorter.

        Everything is computed before anything is assigned, so a failure leaves the batch as
        it was.
        """
        new_layers = layer_states(cache)
        if self._cache is None or self._mask is None:
            layers, merged_mask = new_layers, mask
            merged_pos, merged_next, merged_deltas = positions, first, deltas
        else:
            assert self._positions is not None and self._next is not None
            assert self._deltas is not None
            width = max(self._mask.shape[1], mask.shape[1])
            old_layers = layer_states(self._cache)
            layers = [
                (
                    torch.cat([left_pad(ok, width), left_pad(nk, width)], dim=0),
                    torch.cat([left_pad(ov, width), left_pad(nv, width)], dim=0),
                )
                for (ok, ov), (nk, nv) in zip(old_layers, new_layers, strict=True)
            ]
            merged_mask = torch.cat(
                [left_pad_mask(self._mask, width), left_pad_mask(mask, width)], dim=0
            )
            merged_pos = torch.cat([self._positions, positions])
            merged_next = torch.cat([self._next, first])
            merged_deltas = torch.cat([self._deltas, deltas])
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = merged_mask
        self._positions = merged_pos
        self._next = merged_next
        self._deltas = merged_deltas

    def _drop(self, indices: list[int]) -> None:
        """Remove rows ``indices`` and the cache columns no remaining row needs."""
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self.clear()
            return
        assert self._cache is not None and self._mask is not None
        assert self._positions is not None and self._next is not None
        assert self._deltas is not None
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        # Leading columns that are padding for every remaining row are dead weight: trim them.
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        layers = [
            (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
            for keys, values in layer_states(self._cache)
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = mask[:, start:]
        self._positions = self._positions.index_select(0, index)
        self._next = self._next.index_select(0, index)
        self._deltas = self._deltas.index_select(0, index)


def warmup_continuous(replica: Replica) -> None:
    """Run the continuous path once (prefill, a merge, a few steps) so its kernels are primed."""
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    batch = RunningBatch(
        replica, on_text=lambda k, t: None, on_end=lambda k, r: None, should_stop=lambda k: False
    )
    with replica.lock, torch.inference_mode():
        batch.admit([0], [RowSpec(image, "Describe the image.", 3)])
        batch.step()
        batch.admit([1], [RowSpec(image, "Hi", 2)])
        while len(batch):
            batch.step()
