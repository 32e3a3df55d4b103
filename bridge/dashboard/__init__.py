"""The ops dashboard: a live page of connections, IM links and the engine, plus the admin API.

The composition root calls :func:`setup_dashboard` with an :class:`OpsSource` (usually a
:class:`LiveOpsSource` over the hub, engine and adapters) and the admin token.
"""

from bridge.dashboard.live import LiveOpsSource, adapter_status_dict, engine_status_dict
from bridge.dashboard.recent import RecentErrors
from bridge.dashboard.routes import DASHBOARD_KEY, Dashboard, setup_dashboard
from bridge.dashboard.source import (
    ConnectionPage,
    ConnectionQuery,
    OpsSource,
    connection_row,
    page_rows,
    to_jsonable,
)
from bridge.dashboard.timeline import Sample, Timeline

__all__ = [
    "DASHBOARD_KEY",
    "ConnectionPage",
    "ConnectionQuery",
    "Dashboard",
    "LiveOpsSource",
    "OpsSource",
    "RecentErrors",
    "Sample",
    "Timeline",
    "adapter_status_dict",
    "connection_row",
    "engine_status_dict",
    "page_rows",
    "setup_dashboard",
    "to_jsonable",
]
