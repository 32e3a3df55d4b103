"""GPU benchmark of the engine on a random-weight model with the real Qwen2.5-VL-3B-Instruct shape.

No weights can be fetched, and speed does not depend on weight values, so the model is built
from the published configuration (written out below), saved with a synthetic tokenizer whose
special-token ids match the real ones, and loaded back through the engine's normal path.

It measures, in bf16 with a fixed output length and photos resized to 448–1024 px:
throughput at 16 concurrent jobs with dynamic batching versus one ``generate`` at a time,
GPU utilisation (sampled with ``nvidia-smi``), and the decode step time against the
memory-bandwidth floor (weight bytes / bandwidth; ~3.35 TB/s on an H100 SXM).

    python bench/engine_gpu.py [--jobs 64] [--max-tokens 128] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import io
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import IMAGES

PHOTOS = [
    "astronaut.png",
    "chelsea.jpg",
    "coffee.jpg",
    "hubble.jpg",
    "rocket.jpg",
    "coffee_4032x3024.jpg",
]
H100_BANDWIDTH = 3.35e12

# The published Qwen2.5-VL-3B-Instruct configuration (architecture fields only). Checked field by
# field against the config.json of huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct, as mirrored in
# public repositories found with code search (two independent copies agree): every value below
# matches; that file also carries only torch_dtype and transformers_version, which are not
# architecture. It has no pad_token_id, so the pad id lives in PAD_TOKEN_ID below instead.
QWEN25_VL_3B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 151936,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
# <|endoftext|>: the tokenizer's pad token, used by generate to pad finished rows.
PAD_TOKEN_ID = 151643
QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A shrunken variant with the same structure, for the CPU test that keeps this script alive.
SHRUNK: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
    },
}


def merged_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The 3B configuration with ``overrides`` applied (nested for ``vision_config``)."""
    config = copy.deepcopy(QWEN25_VL_3B)
    for key, value in (overrides or {}).items():
        if key == "vision_config":
            config["vision_config"].update(value)
        else:
            config[key] = value
    return config


def _tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with the real vocabulary size and special-token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    first_special = min(QWEN_SPECIALS.values())
    vocab = {f"w{i}": i for i in range(first_special)}
    vocab.update(QWEN_SPECIALS)
    for i in range(max(QWEN_SPECIALS.values()) + 1, vocab_size):
        vocab[f"x{i}"] = i
    vocab["[UNK]"] = vocab.pop(f"w{first_special - 1}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=list(QWEN_SPECIALS),
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen2.5-VL model (config, weights, processor) to ``out_dir``.

    Args:
        out_dir: destination folder (created).
        overrides: configuration fields to change (``SHRUNK`` for a CPU-sized model).
        device: where to initialise the weights (``cuda`` is much faster for the 3B model).
        dtype: weight dtype written to disk.
        seed: RNG seed for the weights.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    spec = merged_config(overrides)
    config = Qwen2_5_VLConfig(**spec)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch_dtype)  # type: ignore[no-untyped-call]
    model.eval()
    model.generation_config.eos_token_id = spec["eos_token_id"]
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.do_sample = False
    tokenizer = _tokenizer(spec["vocab_size"])
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=448 * 448 // 4,
        max_pixels=1024 * 1024,
        patch_size=spec["vision_config"]["patch_size"],
        merge_size=spec["vision_config"]["spatial_merge_size"],
        temporal_patch_size=spec["vision_config"]["temporal_patch_size"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The processor's parts are written one by one, as in the published checkpoint: building a
    # Qwen2_5_VLProcessor object needs torchvision (for its video processor) only at load time.
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text('{"processor_class": "Qwen2_5_VLProcessor"}')
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir


def photos(min_px: int = 448, max_px: int = 1024) -> list[bytes]:
    """The sample photos re-encoded so their long side lies between ``min_px`` and ``max_px``."""
    from PIL import Image

    out: list[bytes] = []
    sizes = [min_px + (max_px - min_px) * i // max(1, len(PHOTOS) - 1) for i in range(len(PHOTOS))]
    for name, side in zip(PHOTOS, sizes, strict=True):
        img = Image.open(IMAGES / name).convert("RGB")
        img.thumbnail((side, side)) if max(img.size) > side else None
        if max(img.size) < side:
            scale = side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class GpuSampler:
    """Samples GPU utilisation with ``nvidia-smi`` in a background thread."""

    def __init__(self, period_s: float = 0.2) -> None:
        self._period = period_s
        self._stop = threading.Event()
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                        "--id=0",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                )
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return
            self._stop.wait(self._period)

    @property
    def mean(self) -> float:
        """Mean utilisation in percent (0 if nvidia-smi was unavailable)."""
        return statistics.fmean(self.samples) if self.samples else 0.0


async def throughput(
    model: str,
    images: list[bytes],
    jobs: int,
    concurrency: int,
    max_tokens: int,
    max_batch: int,
    device: str = "auto",
    dtype: str = "bfloat16",
) -> dict[str, float]:
    """Jobs/s, tokens/s, p50/p95 latency and GPU utilisation for one engine setting.

    ``model`` is a model folder (or ``tiny``); ``device``/``dtype`` default to the GPU run's and
    are overridden by the CPU test that keeps this path alive.
    """
    from engine import Done, Engine, EngineConfig, JobRequest

    engine = Engine(
        EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            batch_wait_ms=5,
            queue_size=4096,
            max_new_tokens=max_tokens,
            cache_ttl_s=0,
            job_timeout_s=3600,
            ignore_eos=True,
        )
    )
    await engine.start()
    latencies: list[float] = []
    counter = iter(range(jobs))

    async def client() -> None:
        for i in counter:
            started = time.perf_counter()
            handle = engine.submit(
                JobRequest(f"g{i}", images[i % len(images)], f"Describe photo {i}.", max_tokens)
            )
            last = None
            async for event in handle.events():
                last = event
            if not isinstance(last, Done):
                raise RuntimeError(f"job failed: {last}")
            latencies.append(time.perf_counter() - started)

    try:
        with GpuSampler() as sampler:
            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            wall = time.perf_counter() - started
        sizes = engine.status().batch_sizes
    finally:
        await engine.stop()
    latencies.sort()
    return {
        "jobs_s": jobs / wall,
        "tokens_s": jobs * max_tokens / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "gpu_util": sampler.mean,
        "batches": float(sum(sizes.values())),
    }


def decode_step_time(
    model: str, batch: int, steps: int = 64, device: str = "cuda:0", dtype: str = "bfloat16"
) -> tuple[float, int]:
    """Seconds per decode step at ``batch`` rows (prefill excluded) and the weight bytes."""
    import torch
    from PIL import Image

    from engine.model import Replica, RowSpec

    replica = Replica.load(model, device, dtype, ignore_eos=True)
    image = Image.new("RGB", (448, 448), (120, 130, 140))
    rows = [RowSpec(image, f"Describe {i}.", steps) for i in range(batch)]
    stamps: list[float] = []
    on_gpu = device.startswith("cuda")

    def mark() -> None:
        if on_gpu:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    replica.warmup()
    replica.generate(
        rows,
        on_text=lambda i, t: None,
        on_end=lambda i, r: None,
        should_stop=lambda i: False,
        on_step=mark,
    )
    weight_bytes = replica.weight_bytes()
    replica.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]  # stamps[0] follows the prefill
    return statistics.median(gaps), weight_bytes


async def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=H100_BANDWIDTH,
        help="memory bandwidth in bytes/s for the floor",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="reuse a model folder built earlier"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="run another model instead of building Qwen2.5-VL-3B (e.g. 'tiny' for a CPU dry run)",
    )
    parser.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a dry run")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --model tiny --device cpu for a dry run)")
    tmp = None
    if args.model is not None:
        model = args.model
    else:
        if importlib.util.find_spec("torchvision") is None:
            sys.exit("Qwen2.5-VL's processor needs torchvision (matching the installed torch)")
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix="qwen25vl3b-"))
            model_dir = build_model(args.model_dir or tmp, device=args.device, dtype=args.dtype)
            if on_gpu:
                torch.cuda.empty_cache()
        model = str(model_dir)
    engine_device = args.device if not on_gpu else "auto"
    try:
        images = photos()
        common = (images, args.jobs, args.concurrency, args.max_tokens)
        seq = await throughput(model, *common, 1, engine_device, args.dtype)
        bat = await throughput(model, *common, args.concurrency, engine_device, args.dtype)
        step1, weight_bytes = decode_step_time(model, 1, device=args.device, dtype=args.dtype)
        step_n, _ = decode_step_time(model, args.concurrency, device=args.device, dtype=args.dtype)
    finally:
        if tmp is not None and args.model_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(args, seq, bat, step1, step_n, weight_bytes))


def report(
    args: argparse.Namespace,
    seq: dict[str, float],
    bat: dict[str, float],
    step1: float,
    step_n: float,
    weight_bytes: int,
) -> str:
    """The Markdown figures of one run."""
    import torch

    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    floor = weight_bytes / args.bandwidth
    lines = [
        f"device: {name}; weights {weight_bytes / 1e9:.2f} GB {args.dtype}; jobs {args.jobs}, "
        f"max_tokens {args.max_tokens} (fixed), concurrency {args.concurrency}",
        "| mode | jobs/s | tokens/s | p50 s | p95 s | GPU util % |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in (("sequential", seq), ("batched", bat)):
        lines.append(
            f"| {label} | {r['jobs_s']:.2f} | {r['tokens_s']:.0f} | {r['p50']:.2f} "
            f"| {r['p95']:.2f} | {r['gpu_util']:.0f} |"
        )
    lines.append(f"speed-up at {args.concurrency}: {bat['jobs_s'] / seq['jobs_s']:.2f}x")
    lines.append(
        f"decode step: batch 1 {step1 * 1e3:.2f} ms, batch {args.concurrency} "
        f"{step_n * 1e3:.2f} ms; bandwidth floor {floor * 1e3:.2f} ms "
        f"({floor / step1:.0%} of floor reached at batch 1)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    asyncio.run(main())
