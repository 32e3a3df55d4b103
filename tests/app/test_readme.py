"""The README's client example runs as written against a live hub."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from tests.app.fakes import FakeEngine
from tests.app.procs import free_port
from tests.conftest import IMAGES, ROOT


async def test_readme_client_example_gets_an_answer(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import asyncio\n.*?HubClient.*?)```", readme, re.S)
    assert code is not None
    port = free_port()
    script = code.group(1).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    (tmp_path / "example.py").write_text(script)
    (tmp_path / "photo.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    engine = FakeEngine("a cat")
    engine.loaded.set()
    settings = load_settings({"port": str(port), "token": ["my-client-token"]}, env={})
    app = BridgeApp(settings, engine=engine, store=MemoryStore(), adapters=[])
    await app.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "example.py",
            cwd=tmp_path,
            env={"PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await app.stop(grace_s=1.0)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "done a cat" in text
    assert engine.submitted[0].prompt == "What is in this photo?"
