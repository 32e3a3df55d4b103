"""A shrunken random-weight Qwen2.5-VL replica for CPU tests, built without torchvision.

``Qwen2_5_VLProcessor`` cannot be built here: its video processor requires torchvision, which
this environment lacks. :class:`QwenInputs` therefore rebuilds what that processor returns for
one image per prompt from its two parts, the image processor and the tokenizer: it expands each
``<|image_pad|>`` to one placeholder per merged patch and marks them in ``mm_token_type_ids``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from engine.model import Replica

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_gpu.py"
IMAGE_PAD = "<|image_pad|>"


def load_bench() -> ModuleType:
    """bench/engine_gpu.py as a module (it builds the random-weight Qwen2.5-VL folder)."""
    spec = importlib.util.spec_from_file_location("engine_gpu_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class QwenInputs:
    """The Qwen2.5-VL processor's image+text path, from its image processor and tokenizer."""

    def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = IMAGE_PAD
        self._image_token_id = image_token_id

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any:
        """The tokenizer's chat template (the processor delegates to the same one)."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(
        self, text: list[str], images: list[Any], padding: bool, return_tensors: str
    ) -> BatchFeature:
        """Input ids, mask, ``mm_token_type_ids``, pixel values and grids for one image a text."""
        vision = self.image_processor(images=images, return_tensors=return_tensors)
        merge = int(self.image_processor.merge_size) ** 2
        counts = (vision["image_grid_thw"].prod(-1) // merge).tolist()
        expanded = [
            t.replace(IMAGE_PAD, IMAGE_PAD * int(n), 1) for t, n in zip(text, counts, strict=True)
        ]
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        types = (encoded["input_ids"] == self._image_token_id).int()
        return BatchFeature(
            {**encoded, "mm_token_type_ids": types, **vision}, tensor_type=return_tensors
        )


# Weights drawn wider than the published 0.02: at 0.02 the shrunken model answers one token
# whatever the positions, so a wrong rope delta would go unnoticed; at 1.0 greedy answers vary
# and a row decoded with another row's delta picks different tokens.
INITIALIZER_RANGE = 1.0


def build_qwen_replica(folder: Path) -> Replica:
    """Write the shrunken Qwen2.5-VL model to ``folder`` and load it as a float32 CPU replica."""
    bench = load_bench()
    overrides = {**bench.SHRUNK, "initializer_range": INITIALIZER_RANGE}
    model_dir = bench.build_model(folder, overrides=overrides, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (model_dir / "chat_template.jinja").read_text()
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = QwenInputs(tokenizer, image_processor, int(model.config.image_token_id))
    return Replica("qwen-shrunk", str(model_dir), "cpu", torch.float32, model, processor)


def build_qwen3_replica() -> Replica:
    """A shrunken random-weight Qwen3-VL (interleaved mrope, deepstack) as a CPU replica.

    Same tokenizer, chat template and special ids as the Qwen2.5-VL one; Qwen3-VL's vision
    tower takes 16-pixel patches.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    bench = load_bench()
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": bench.QWEN25_VL_3B["vocab_size"],
        "rope_scaling": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "initializer_range": INITIALIZER_RANGE,
        "tie_word_embeddings": True,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [1],
        "num_position_embeddings": 144,
        "initializer_range": INITIALIZER_RANGE,
    }
    ids = {k: bench.QWEN25_VL_3B[k] for k in ("image_token_id", "video_token_id")}
    ids |= {k: bench.QWEN25_VL_3B[k] for k in ("vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = bench.QWEN25_VL_3B["eos_token_id"]
    model.generation_config.pad_token_id = bench.PAD_TOKEN_ID
    model.generation_config.do_sample = False
    tokenizer = bench._tokenizer(text["vocab_size"])
    tokenizer.chat_template = bench.CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(  # type: ignore[no-untyped-call]
        min_pixels=448 * 448 // 4, max_pixels=1024 * 1024, patch_size=16, merge_size=2
    )
    processor = QwenInputs(tokenizer, image_processor, ids["image_token_id"])
    return Replica("qwen3-shrunk", "", "cpu", torch.float32, model, processor)
