"""The SQLite store's exclusive lock: one open store per file, released on close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.store import StoreInUse
from bridge.store.sqlite import SqliteStore


async def test_a_second_open_store_on_the_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    first, second = SqliteStore(url), SqliteStore(url)
    await first.open()
    try:
        assert first.lock_path.read_text().strip() == str(os.getpid())
        with pytest.raises(
            StoreInUse, match=rf"in use by another bridge process \(pid {os.getpid()}\)"
        ):
            await second.open()
    finally:
        await first.close()
    await second.open()  # released on close
    await second.ping()
    await second.close()
