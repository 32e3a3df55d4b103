"""The built-in tiny model: a real LLaVA-style image-text-to-text checkpoint with random weights.

It is written with ``save_pretrained`` and loaded back through ``AutoProcessor`` and
``AutoModelForImageTextToText`` exactly as a downloaded checkpoint is, so tests exercise the
production loading path fully offline. LLaVA is chosen because its processor needs no torchvision.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 384
IMAGE_SIZE = 32
PATCH_SIZE = 8
MARKER = "bridge-tiny-model.json"
VERSION = 1

# A small fixed corpus keeps the trained tokenizer deterministic and its pieces readable.
_CORPUS = [
    "A photo of a cat sitting on a sofa next to a cup of coffee.",
    "The astronaut stands in front of the flag, smiling at the camera.",
    "A rocket lifts off from the launch pad under a clear blue sky.",
    "Describe the image. What is in this picture? There are stars and galaxies.",
    "The answer is short and helpful: a red mug, a white plate, two spoons.",
    "Hello world! Numbers 0 1 2 3 4 5 6 7 8 9, punctuation: ; , . ? ( ) and quotes.",
    "Bonjour, 你好, こんにちは, привет — unicode text streams in pieces.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def default_cache_dir() -> Path:
    """Where ``--model tiny`` keeps its built checkpoint (``$BRIDGE_CACHE_DIR`` or XDG cache)."""
    base = os.environ.get("BRIDGE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("BRIDGE_CACHE_DIR"):
        root = root / "bridge"
    return root / f"tiny-model-v{VERSION}"


def _build_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | os.PathLike[str], keep_current: bool = False) -> Path:
    """Write the tiny model (weights, config, tokenizer, processor) to ``out_dir``.

    The build is seeded, so two builds give identical weights. The folder is written to a
    temporary sibling first and renamed into place so a crash never leaves half a model, and a
    folder being replaced is renamed away before it is deleted, so no reader ever sees one half
    gone.

    Args:
        out_dir: destination folder; created, and replaced if it exists.
        keep_current: keep a complete current-version folder that is already there (another
            process sharing the cache built it first) instead of replacing it.

    Returns:
        The destination path.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    dest = Path(out_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    vocab = len(tokenizer)  # type: ignore[arg-type]
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")  # type: ignore[attr-defined]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
            eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
            pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
            tie_word_embeddings=False,
        ),
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    # Random weights rarely emit EOS; nudge the EOS logit so some answers end early and the
    # per-row stop path is exercised, as it is with a real model.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 1.5  # type: ignore[attr-defined]
    model.generation_config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # type: ignore[attr-defined]
    model.generation_config.do_sample = False

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION, "seed": SEED}))
        _move_into_place(tmp, dest, keep_current)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_current(folder: Path) -> bool:
    """Whether ``folder`` holds a complete tiny model of this version (the marker comes last)."""
    try:
        return bool(json.loads((folder / MARKER).read_text()).get("version") == VERSION)
    except (OSError, ValueError):
        return False


def _move_into_place(built: Path, dest: Path, keep_current: bool) -> None:
    """Rename ``built`` to ``dest``; processes sharing a cache may race here, and none of them
    may delete a folder another one is loading."""
    if keep_current and _is_current(dest):
        return  # another process finished first: its identical copy stays
    if dest.exists():
        aside = Path(tempfile.mkdtemp(prefix=".tiny-old-", dir=dest.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            dest.rename(aside / "model")
        shutil.rmtree(aside, ignore_errors=True)
    try:
        built.rename(dest)
    except OSError:
        # A non-empty folder appeared at ``dest`` meanwhile: another process won the race.
        if not (keep_current and _is_current(dest)):
            raise


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model folder, building it first if missing or outdated."""
    dest = cache_dir or default_cache_dir()
    if _is_current(dest):
        return dest
    return build_tiny_model(dest, keep_current=True)
