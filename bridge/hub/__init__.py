"""The WebSocket hub (docs/protocol.md): resumable sessions, heartbeats and backpressure on /ws."""

from __future__ import annotations

from bridge.hub.config import HubConfig
from bridge.hub.hub import ConnectionInfo, Hub

__all__ = ["ConnectionInfo", "Hub", "HubConfig"]
