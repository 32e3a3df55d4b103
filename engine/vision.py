"""Running a model's vision tower apart from its prefill, so its output can be cached.

Architecture-neutral through transformers' ``mm_encoder_outputs``: a model whose forward takes
it (and whose base model has ``get_image_features``) accepts precomputed image features, the
same way ``generate`` pre-encodes images itself. Text is then tokenized with the image
placeholder repeated once per feature row; :func:`probe` checks once per replica that this gives
exactly the processor's own input ids, and the cache stays off for any model where it does not.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from engine.vision_cache import VisionCache, vision_key

if TYPE_CHECKING:
    from engine.model import Replica, RowSpec


@dataclass(frozen=True, slots=True)
class VisionRef:
    """A job's place in the vision cache: the model load (``tag``) and key its features are
    cached under, and the features themselves when the lookup hit."""

    tag: str
    key: str
    features: torch.Tensor | None = None


def unsupported_reason(model: Any, processor: Any) -> str | None:
    """Why ``model`` cannot take precomputed image features, or None when it can (static checks;
    :func:`probe` then checks the token layout on a real image)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "the model's forward has no readable signature"
    if "mm_encoder_outputs" not in params:
        return "the model's forward takes no precomputed image features (mm_encoder_outputs)"
    if "image" not in tuple(getattr(model, "input_modalities", ()) or ()):
        return "the model declares no image input"
    if getattr(getattr(model, "base_model", None), "get_image_features", None) is None:
        return "the model has no get_image_features"
    if not isinstance(getattr(processor, "image_token", None), str):
        return "the processor names no image placeholder token"
    if getattr(processor, "image_processor", None) is None:
        return "the processor has no image processor"
    return None


def preprocessing_of(processor: Any, pixel_budget: int) -> str:
    """What decides an image's pixel values besides its bytes: resize and crop settings and the
    engine's downscale budget (part of the cache key)."""
    image_processor = getattr(processor, "image_processor", None)
    fields = {
        name: getattr(image_processor, name, None)
        for name in ("size", "crop_size", "patch_size", "resample", "do_center_crop")
    }
    fields["budget"] = pixel_budget
    return json.dumps(fields, sort_keys=True, default=str)


class VisionEncoder:
    """One replica's split path: vision tower (or cache) first, then prefill with the features.

    Features computed for a row with a :class:`VisionRef` are stored under its key, on this
    replica's device, through ``store`` (which drops those of a load no longer serving).
    """

    def __init__(
        self, replica: Replica, store: Callable[[str, str, torch.Tensor], None], tag: str
    ) -> None:
        self.replica = replica
        self._store = store
        self.tag = tag
        model = replica.model
        self._encoder: Callable[..., Any] = model.base_model.get_image_features
        self._encoder_args = set(inspect.signature(self._encoder).parameters) - {"kwargs"}
        self._image_token: str = replica.processor.image_token
        self.preprocessing = preprocessing_of(replica.processor, replica.pixel_budget)

    def features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Run preprocessing and the vision tower on ``images``: one ``[tokens, hidden]`` each."""
        replica = self.replica
        pixels = replica.processor.image_processor(images=list(images), return_tensors="pt")
        kwargs: dict[str, Any] = {}
        for name, value in pixels.items():
            if name not in self._encoder_args:
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(replica.input_device)
                if value.is_floating_point():
                    value = value.to(replica.dtype)
            kwargs[name] = value
        out = self._encoder(**kwargs, return_dict=True)
        pooled = out.pooler_output
        if not isinstance(pooled, list | tuple) or len(pooled) != len(images):
            raise RuntimeError("get_image_features did not return one tensor per image")
        return list(pooled)

    def encode(self, rows: Sequence[RowSpec], image_of: Callable[[RowSpec], Image.Image]) -> Any:
        """Model inputs for ``rows``: ids with placeholders expanded, mask, precomputed features.

        Rows whose ref carries features of this model load skip the vision tower; the others
        run it together and, with a ref, are cached.
        """
        device = self.replica.input_device
        feats: list[torch.Tensor | None] = []
        for row in rows:
            ref = row.vision
            if ref is not None and ref.features is not None and ref.tag == self.tag:
                feats.append(ref.features.to(device))
            else:
                feats.append(None)
        missing = [i for i, f in enumerate(feats) if f is None]
        if missing:
            computed = self.features([image_of(rows[i]) for i in missing])
            for i, value in zip(missing, computed, strict=True):
                feats[i] = value
                ref = rows[i].vision
                if ref is not None and ref.tag == self.tag:
                    self._store(self.tag, ref.key, value)
        ready = [f for f in feats if f is not None]
        texts = [
            self.expand(self.replica.prompt_text(row.prompt), int(f.shape[0]))
            for row, f in zip(rows, ready, strict=True)
        ]
        inputs = self.replica.tokenizer(texts, padding=True, return_tensors="pt").to(device)
        # Per-image tensors, as get_image_features itself returns them (the forward concatenates).
        output = BaseModelOutputWithPooling(pooler_output=ready)  # type: ignore[arg-type]
        inputs["mm_encoder_outputs"] = {"image": output}
        return inputs

    def expand(self, text: str, tokens: int) -> str:
        """``text`` with its one image placeholder repeated ``tokens`` times."""
        return text.replace(self._image_token, self._image_token * tokens, 1)


def probe(encoder: VisionEncoder) -> str | None:
    """Why the split path would not reproduce the processor path, or None when it does.

    On a small grey image: the expanded input ids and mask must equal the processor's, and the
    prefill logits from precomputed features must match those from pixels (a model that needs
    more than the features, e.g. image grid sizes for its positions, fails here).
    """
    replica = encoder.replica
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    from engine.model import RowSpec  # here: engine.model imports this module

    try:
        with torch.inference_mode():
            reference = replica.encode(["Describe the image."], [image])
            ours = encoder.encode([RowSpec(image, "Describe the image.", 1)], lambda r: image)
            if not all(
                name in reference and torch.equal(reference[name], ours[name])
                for name in ("input_ids", "attention_mask")
            ):
                return "the processor's image placeholders are not one token per feature row"
            want = replica.model(**reference).logits[:, -1].float()
            got = replica.model(**ours).logits[:, -1].float()
    except Exception as exc:  # an architecture whose encoder cannot run on its own
        return f"the vision tower cannot run on its own: {type(exc).__name__}"
    if not torch.equal(want.argmax(-1), got.argmax(-1)) or not torch.allclose(
        want, got, rtol=1e-3, atol=1e-3
    ):
        return "prefill from precomputed features differs from prefill from pixels"
    return None


@dataclass(frozen=True, slots=True)
class VisionContext:
    """What a decode thread needs to look a job's image up: the serving load's tag and
    preprocessing (fixed when the job is submitted, like the image limits)."""

    tag: str
    preprocessing: str


class VisionFeatures:
    """The engine's side of the vision cache: attaches encoders to the replicas that can use
    them, says why it is off, and looks images up for decode threads."""

    def __init__(self, cache: VisionCache) -> None:
        self.cache = cache
        self.reason: str | None = None if cache.enabled else "off (--vision-cache-bytes 0)"
        self.context: VisionContext | None = None

    def attach(self, replica: Replica, tag: str) -> None:
        """Give ``replica`` an encoder when the cache is on and its model passes the probe."""
        if not self.cache.enabled:
            return
        reason = unsupported_reason(replica.model, replica.processor)
        encoder = None
        if reason is None:
            encoder = VisionEncoder(replica, self.store, tag)
            reason = probe(encoder)
        replica.vision = encoder if reason is None else None
        replica.vision_reason = reason

    def install(self, replicas: Sequence[Replica], model: str) -> str | None:
        """The replicas now serving: forget the old load's features, switch the lookup context.

        Returns why the cache is off for ``model`` when it newly is (to log once), else None.
        """
        self.cache.clear()
        if not self.cache.enabled:
            return None
        first = replicas[0].vision
        if first is None or any(r.vision is None for r in replicas):
            self.context = None
            reasons = [r.vision_reason for r in replicas if r.vision_reason]
            self.reason = reasons[0] if reasons else "the model cannot take cached features"
            return self.reason
        self.context = VisionContext(first.tag, first.preprocessing)
        self.reason = None
        return None

    def store(self, tag: str, key: str, features: torch.Tensor) -> None:
        """Keep features computed by the load ``tag`` if it is the one serving (after a hot swap,
        a batch still finishing on the old model must not refill the cache)."""
        context = self.context
        if context is not None and context.tag == tag:
            self.cache.put(key, features)

    def lookup(self, image: bytes, context: VisionContext) -> VisionRef:
        """The job's cache reference, with the features when they are cached."""
        key = vision_key(context.tag, hashlib.sha256(image).digest(), context.preprocessing)
        return VisionRef(context.tag, key, self.cache.get(key))

    def status(self) -> dict[str, Any]:
        """Whether the cache runs for the serving model (and why not), with its counts."""
        return {"enabled": self.context is not None, "reason": self.reason, **self.cache.snapshot()}
