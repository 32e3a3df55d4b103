"""Builds the :class:`~bridge.http.routes.HttpApi` of a :class:`~bridge.app.BridgeApp` from its
settings, hub and engine (kept here so the composition root stays a few lines)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bridge.http.jobs import HubSubmitter
from bridge.http.parse import Limits
from bridge.http.routes import HttpApi, HttpApiConfig
from bridge.hub.auth import TokenGate
from bridge.hub.submitlimit import SharedSubmitLimit

if TYPE_CHECKING:
    from bridge.app import BridgeApp

#: Time allowed to fetch an ``image_url``: the same as an IM platform's image download.
FETCH_TIMEOUT_S = 10.0


def build_http_api(app: BridgeApp, max_body_bytes: int) -> HttpApi:
    """The HTTP API on ``app``'s client tokens, submit limit, inflight budget and engine."""
    cfg = app.hub.cfg
    settings = app.settings

    def model_ids() -> list[str]:
        ids = [app.engine.status().model or settings.model]
        if settings.model == "tiny" and "tiny" not in ids:
            ids.append("tiny")
        return ids

    def ready() -> bool:
        return not app.draining and app.engine.status().ready

    limits = Limits(
        max_image_bytes=settings.limits.max_image_bytes,
        max_prompt_chars=settings.limits.max_prompt_chars,
        image_hosts=frozenset(settings.http_image_hosts),
    )
    limit = SharedSubmitLimit(app.store, cfg.token_submit_rate, time.monotonic)
    return HttpApi(
        HttpApiConfig(limits, max_body_bytes, FETCH_TIMEOUT_S),
        gate=TokenGate(cfg),
        label_of=cfg.label_of,
        submitter=HubSubmitter(app.hub.inflight, limit),
        budget=app.hub.inflight,
        model_ids=model_ids,
        ready=ready,
        runner=app.jobs,
    )
