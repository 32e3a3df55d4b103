"""The tiny model: built offline, deterministic, small, and loaded through the real Auto* path."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from engine.tiny import build_tiny_model, ensure_tiny_model


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_build_is_small_deterministic_and_complete(built: Path, tmp_path: Path) -> None:
    size = sum(p.stat().st_size for p in built.iterdir())
    assert size < 3 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (built / name).exists(), name
    again = build_tiny_model(tmp_path / "again")
    assert digest(built)["model.safetensors"] == digest(again)["model.safetensors"]
    assert digest(built)["tokenizer.json"] == digest(again)["tokenizer.json"]


def test_round_trip_through_auto_classes_generates(built: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(built)
    model = AutoModelForImageTextToText.from_pretrained(built).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>" in prompt and prompt.endswith("ASSISTANT:")
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 6
    text = processor.tokenizer.decode(new, skip_special_tokens=True)
    assert isinstance(text, str)
    # Greedy decoding is deterministic.
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)


def test_ensure_reuses_the_cache_and_rebuilds_a_broken_one(tmp_path: Path) -> None:
    folder = ensure_tiny_model(tmp_path / "cache")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    (folder / "bridge-tiny-model.json").write_text("{not json")
    rebuilt = ensure_tiny_model(tmp_path / "cache")
    assert (rebuilt / "config.json").exists()
    buf = io.BytesIO((rebuilt / "bridge-tiny-model.json").read_bytes())
    assert b'"version"' in buf.getvalue()


def test_processes_sharing_an_empty_cache_all_load_the_model(tmp_path: Path) -> None:
    """Bridges starting at once on a fresh machine build the cache concurrently and all load it.

    The race a fresh-clone CI run once lost (one process deleting the folder another was
    loading) depends on timing, so the next test pins the rule that prevents it: a process that
    finishes second keeps the first one's copy.
    """
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys; from pathlib import Path; "
        "from transformers import AutoModelForImageTextToText, AutoProcessor; "
        "from engine.tiny import ensure_tiny_model; "
        "p = ensure_tiny_model(Path(sys.argv[1])); "
        "AutoProcessor.from_pretrained(p); AutoModelForImageTextToText.from_pretrained(p); "
        "print('loaded')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and out.strip().endswith("loaded"), out[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folders left


def test_a_finished_copy_from_another_process_is_kept(tmp_path: Path) -> None:
    from engine.tiny import _move_into_place

    dest = tmp_path / "cache"
    first = ensure_tiny_model(dest)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    late = tmp_path / "late-build"
    late.mkdir()
    (late / "model.safetensors").write_text("another build")
    _move_into_place(late, dest, keep_current=True)  # lost the race: keeps the finished copy
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp
    _move_into_place(late, dest, keep_current=False)  # make-tiny-model DIR: replaces
    assert (dest / "model.safetensors").read_text() == "another build"
