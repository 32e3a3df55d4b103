"""The GPU benchmark's model builder, shrunk to CPU size, so the script cannot rot unnoticed.

It checks the written folder (config, tokenizer ids, chat template) and generates with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.engine.qwen_fixtures import load_bench


def test_real_config_shape() -> None:
    bench = load_bench()
    config = bench.merged_config()
    assert config["hidden_size"] == 2048 and config["num_hidden_layers"] == 36
    assert config["vocab_size"] == 151936 and config["vision_config"]["depth"] == 32


def test_shrunken_model_builds_loads_and_generates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    bench = load_bench()
    model_dir = bench.build_model(tmp_path / "qwen", overrides=bench.SHRUNK, dtype="float32")
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "qwen2_5_vl" and config.image_token_id == 151655
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.eos_token_id == 151645
    assert config.text_config.hidden_size == 64 and config.text_config.vocab_size == 151936
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "w1 w2"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert len(bench.photos()) == len(bench.PHOTOS)


def test_benchmark_path_runs_on_cpu_with_the_tiny_model() -> None:
    """Everything the GPU run does after building the model: both engines, step timing, report."""
    import argparse
    import asyncio

    bench = load_bench()
    images = bench.photos()
    seq = asyncio.run(bench.throughput("tiny", images, 6, 3, 4, 1, "cpu", "float32"))
    bat = asyncio.run(bench.throughput("tiny", images, 6, 3, 4, 3, "cpu", "float32"))
    assert seq["batches"] == 6  # max_batch=1: one generate per job
    assert 1 <= bat["batches"] <= 6
    for run in (seq, bat):
        assert run["jobs_s"] > 0 and run["tokens_s"] == run["jobs_s"] * 4
        assert 0 < run["p50"] <= run["p95"]
    step, weight_bytes = bench.decode_step_time("tiny", 2, steps=4, device="cpu", dtype="float32")
    assert step > 0 and weight_bytes > 0
    args = argparse.Namespace(
        device="cpu", dtype="float32", jobs=6, max_tokens=4, concurrency=3, bandwidth=1e12
    )
    text = bench.report(args, seq, bat, step, step, weight_bytes)
    assert "| sequential |" in text and "| batched |" in text and "speed-up at 3:" in text
