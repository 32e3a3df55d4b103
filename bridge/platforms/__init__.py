"""Wiring of the IM platforms: which adapters a process runs, and the HTTP routes they own.

Each platform has one module here (``feishu``, ``slack``, ``telegram``, ``dingtalk``, ``wecom``)
with three functions, so adding a platform touches its own module and the tuple below only:

- ``check(settings)`` raises :class:`bridge.config.ConfigError` for an incomplete combination;
- ``build(settings, metrics)`` returns the platform's adapters (none when it is off); a module
  that sets ``USES_STORE = True`` gets the bridge's store too (``build(settings, metrics, store)``);
- ``routes(adapter, settings)`` returns the ``(method, path, handler)`` webhook routes it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from types import ModuleType
from typing import Any

from aiohttp import web

from adapters.base import Adapter
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.platforms import dingtalk, feishu, slack, telegram, wecom
from bridge.store import Store

Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]
Route = tuple[str, str, Handler]

PLATFORMS: tuple[ModuleType, ...] = (feishu, slack, telegram, dingtalk, wecom)


def check_settings(settings: Settings) -> None:
    """Raise ``ConfigError`` when any platform's options do not fit together."""
    for module in PLATFORMS:
        module.check(settings)


def build_adapters(
    settings: Settings, metrics: Metrics, store: Store | None = None
) -> list[Adapter]:
    """Every adapter the settings switch on, in platform order."""
    out: list[Adapter] = []
    for module in PLATFORMS:
        if getattr(module, "USES_STORE", False):
            out.extend(module.build(settings, metrics, store))
        else:
            out.extend(module.build(settings, metrics))
    return out


def webhook_routes(adapters: Sequence[Adapter], settings: Settings) -> list[Route]:
    """The HTTP routes the running adapters serve (``/webhooks/<platform>``)."""
    by_name = {m.__name__.rsplit(".", 1)[-1]: m for m in PLATFORMS}
    out: list[Route] = []
    for adapter in adapters:
        module = by_name.get(adapter.platform)
        if module is not None:
            out.extend(module.routes(adapter, settings))
    return out
