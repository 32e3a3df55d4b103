"""Which batching mode a replica runs: whether a model can run the continuous loop at all, and
whether ``batching="auto"`` trusts it, decided once per replica at load."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.mrope import rope_index_of

if TYPE_CHECKING:
    from engine.model import Replica

# Text backbones on which continuous batching is verified token for token against ``generate``
# (tests/engine/test_continuous.py); ``batching="auto"`` turns it on only for these.
KNOWN_GOOD_BACKBONES = frozenset({"llama", "qwen2_5_vl_text", "qwen3_vl_text"})

# Generation settings that make ``generate`` change logits in ways this loop does not reproduce.
_LOGIT_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
}


def continuous_support(model: Any, generation_config: Any) -> str | None:
    """Why ``model`` cannot run continuous batching, or ``None`` when it can.

    Refused: models keeping position state between calls that this loop cannot compute per
    row (``rope_deltas`` or mrope without a ``get_rope_index``), encoder-decoders, caches that
    are not plain dynamic layers (sliding window, linear attention), and generation settings
    that alter logits (repetition penalty, n-gram bans, ...), which this greedy loop does not
    apply.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    has_index = rope_index_of(model) is not None
    for holder in (model, getattr(model, "model", None)):
        if holder is not None and hasattr(holder, "rope_deltas") and not has_index:
            return "the model keeps multimodal rope state between calls (rope_deltas)"
    text = config.get_text_config(decoder=True)
    for attr in ("rope_scaling", "rope_parameters"):
        rope = getattr(text, attr, None)
        is_mrope = isinstance(rope, dict) and (
            "mrope_section" in rope or rope.get("type") == "mrope"
        )
        if is_mrope and not has_index:
            return "the model uses multi-axis (mrope) positions without a get_rope_index"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # an exotic config the cache cannot even describe
        return f"cannot build a dynamic cache for the model: {type(exc).__name__}"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "the model's cache has sliding-window or non-attention layers"
    for name, neutral in _LOGIT_SETTINGS.items():
        if getattr(generation_config, name, None) not in neutral:
            return f"generation setting {name} is not applied by the continuous loop"
    return None


def backbone_of(model: Any) -> str:
    """The ``model_type`` of the model's text decoder (``llama`` for the tiny LLaVA)."""
    return str(getattr(model.config.get_text_config(decoder=True), "model_type", ""))


def choose_batching(requested: str, replica: Replica) -> tuple[str, str | None]:
    """The batching mode ``replica`` runs under for ``requested`` and, when it differs, why.

    ``static`` stays static; ``continuous`` is honoured unless the model cannot support it;
    ``auto`` also requires a text backbone in :data:`KNOWN_GOOD_BACKBONES`.
    """
    if requested == "static":
        return "static", None
    reason = continuous_support(replica.model, replica.generation_config)
    if reason is not None:
        return "static", reason
    if requested == "auto" and backbone_of(replica.model) not in KNOWN_GOOD_BACKBONES:
        return "static", f"continuous batching is not verified on {backbone_of(replica.model)!r}"
    return "continuous", None
