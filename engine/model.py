"""Loading a Hugging Face image-text-to-text model and running one batched ``generate`` on it.

Architecture-neutral: everything model-specific comes from ``AutoProcessor`` (chat template,
image preprocessing, padding) and ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from engine.devices import free_memory, is_oom, resolve_devices, resolve_dtype
from engine.images import pixel_budget_of
from engine.loading import resolve_model
from engine.progress import LoadProgress
from engine.rows import RowResult, RowSpec, StepUsage, row_image, spec_of
from engine.sanitize import PromptGuard
from engine.streamer import BatchStreamer
from engine.trackers import DownloadTracker, tracking
from engine.vision import VisionEncoder

if TYPE_CHECKING:
    pass

log = structlog.get_logger(__name__)

#: Devices and dtypes live in engine.devices, row values in engine.rows; re-exported here.
__all__ = [
    "FaultHook",
    "Replica",
    "RowResult",
    "RowSpec",
    "StepUsage",
    "free_memory",
    "is_oom",
    "resolve_devices",
    "resolve_dtype",
    "resolve_model_path",
    "row_image",
    "spec_of",
]

FaultHook = Callable[[int], None]
"""Called with the batch size right before ``generate``; tests raise from it to inject faults."""


def resolve_model_path(model: str) -> str:
    """``tiny`` → the built-in tiny model's folder; anything else is passed through."""
    if model == "tiny":
        from engine.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return model


class _StepCriteria(StoppingCriteria):  # type: ignore[misc]
    """Adapts :class:`BatchStreamer` to ``generate``: sees each step's new tokens, returns the
    per-row finished flags (called on every step, before transformers' own streamer hook)."""

    def __init__(self, streamer: BatchStreamer, on_step: Callable[[], None]) -> None:
        self._streamer = streamer
        self._on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tokens = input_ids[:, -1].tolist()
        done = self._streamer.step(tokens)
        self._on_step()
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Replica:
    """One copy of the model on one device (or spread by a device_map).

    ``generate`` is serialised by a lock: some models (Qwen-VL) keep per-call state on the model.
    """

    def __init__(
        self,
        name: str,
        path: str,
        device: str,
        dtype: torch.dtype,
        model: Any,
        processor: Any,
        ignore_eos: bool = False,
    ) -> None:
        self.name = name
        self.path = path
        self.device = device
        self.dtype = dtype
        self.model = model
        self.processor = processor
        self.fault_hook: FaultHook | None = None
        # Continuous batching only: called with the live row count before every decode step.
        self.step_fault_hook: FaultHook | None = None
        # Set by the engine when the vision cache is on and the model can take cached features.
        self.vision: VisionEncoder | None = None
        self.vision_reason: str | None = None
        self._lock = threading.Lock()
        tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        self.pad_id = _first_id(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        # User text never reaches the template raw: see engine.sanitize.
        self.guard = PromptGuard.for_processor(processor)
        self.eos_ids = set() if ignore_eos else _eos_ids(model, tokenizer)
        self.pixel_budget, self.min_short_edge = pixel_budget_of(
            getattr(processor, "image_processor", None)
        )
        gen = GenerationConfig.from_model_config(model.config)
        base = getattr(model, "generation_config", None)
        if base is not None:
            gen = GenerationConfig(**base.to_dict())
        gen.do_sample = False
        gen.num_beams = 1
        gen.temperature = None
        gen.top_p = None
        gen.top_k = None
        gen.pad_token_id = self.pad_id
        gen.eos_token_id = sorted(self.eos_ids) or None
        self.generation_config = gen

    @classmethod
    def load(
        cls,
        name: str,
        device: str,
        dtype_name: str,
        device_map: str | None = None,
        ignore_eos: bool = False,
        progress: LoadProgress | None = None,
    ) -> Replica:
        """Load processor and model onto ``device`` (``map`` = use ``device_map``).

        ``progress`` is fed as the load goes (phase, shards, bytes, weights) and its cancel flag is
        honoured at each step (see :mod:`engine.loading`).

        Raises:
            ModelUnavailable: ``name`` is no model folder, or a hub id that cannot be fetched now.
            LoadCancelled: ``progress`` was cancelled meanwhile.
        """
        hf_logging.disable_progress_bar()
        progress = progress or LoadProgress(name)
        dtype = resolve_dtype(dtype_name, device)
        started = time.monotonic()
        with tracking(progress):
            source = resolve_model(name, progress)
            path = source.path
            common: dict[str, Any] = {"local_files_only": True} if source.local_files_only else {}
            progress.set_phase("loading processor", device)
            processor = AutoProcessor.from_pretrained(path, **common)
            kwargs: dict[str, Any] = {"dtype": dtype, "tqdm_class": DownloadTracker, **common}
            if device == "map":
                kwargs["device_map"] = device_map
            progress.set_phase("loading weights", device)
            model: Any = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            if device != "map":
                progress.set_phase(f"moving weights to {device}", device)
                model = model.to(device)
            model.eval()
        log.info(
            "engine.model_loaded",
            model=name,
            device=device,
            dtype=str(dtype),
            seconds=round(time.monotonic() - started, 2),
        )
        return cls(name, path, device, dtype, model, processor, ignore_eos)

    @property
    def lock(self) -> threading.Lock:
        """Held while the model runs: one forward pass sequence at a time per replica."""
        return self._lock

    @property
    def input_device(self) -> torch.device:
        """Where the inputs go (the first parameter's device under a device_map)."""
        return next(self.model.parameters()).device  # type: ignore[no-any-return]

    def encode(self, prompts: list[str], images: list[Any]) -> Any:
        """Prompts with their images as model inputs, on this replica's device and dtype."""
        texts = [self.prompt_text(p) for p in prompts]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.input_device)
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.is_floating_point():
            inputs["pixel_values"] = pixels.to(self.dtype)
        return inputs

    def encode_rows(self, rows: Sequence[RowSpec]) -> Any:
        """Model inputs for ``rows``: through the vision cache's split path when it is on, else
        the processor on text and images together."""
        if self.vision is not None:
            return self.vision.encode(rows, row_image)
        return self.encode([r.prompt for r in rows], [row_image(r) for r in rows])

    def prompt_text(self, prompt: str) -> str:
        """The chat-templated text for one image plus ``prompt``.

        ``prompt`` is made valid Unicode and every control-token spelling in it is broken first
        (:class:`~engine.sanitize.PromptGuard`), so user text always reaches the model as text:
        it can neither add image placeholders nor close the user turn.
        """
        text = self.guard.clean(prompt)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        return str(
            self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    def generate(
        self,
        rows: Sequence[RowSpec],
        on_text: Callable[[int, str], None],
        on_end: Callable[[int, RowResult], None],
        should_stop: Callable[[int], bool],
        on_step: Callable[[], None] = lambda: None,
    ) -> StepUsage:
        """Run one batched greedy ``generate``, streaming each row as it goes.

        ``on_text(row, piece)`` gets each new piece of text, ``on_end(row, result)`` fires once
        per row as soon as that row ends (EOS, its own ``max_tokens``, or ``should_stop``), so a
        short answer is not held back by a long one in the same batch; ``on_step()`` follows
        every decode step.

        Raises:
            torch.OutOfMemoryError: the batch does not fit (the caller splits and retries).
        """
        with self._lock, torch.inference_mode():
            if self.fault_hook is not None:
                self.fault_hook(len(rows))
            inputs = self.encode_rows(rows)
            prompt_tokens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
            streamer = BatchStreamer(
                max_tokens=[r.max_tokens for r in rows],
                eos_ids=self.eos_ids,
                decode=self.decode,
                on_text=on_text,
                on_end=lambda i, reason: on_end(
                    i, RowResult(reason, prompt_tokens[i], streamer.rows[i].produced)
                ),
                should_stop=should_stop,
            )
            config = copy.deepcopy(self.generation_config)
            config.max_new_tokens = max(r.max_tokens for r in rows)
            self.model.generate(
                **inputs,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_StepCriteria(streamer, on_step)]),
            )
            streamer.finish()
            return StepUsage(streamer.steps, streamer.active_row_steps, len(rows))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def warmup(self) -> None:
        """One short generate so kernels, caches and allocators are primed before serving."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        self.generate(
            [RowSpec(image, "Describe the image.", 2)],
            on_text=lambda i, t: None,
            on_end=lambda i, r: None,
            should_stop=lambda i: False,
        )

    def memory(self) -> dict[str, int]:
        """Bytes of GPU memory allocated on this replica's CUDA device (empty on CPU)."""
        if not self.device.startswith("cuda") or not torch.cuda.is_available():
            return {}
        return {self.device: int(torch.cuda.memory_allocated(torch.device(self.device)))}

    def weight_bytes(self) -> int:
        """Total bytes of the model's parameters."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        self.model = None
        free_memory()


def _first_id(*ids: Any) -> int:
    for value in ids:
        if isinstance(value, int):
            return value
        if isinstance(value, list) and value:
            return int(value[0])
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    return found
