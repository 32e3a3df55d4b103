"""deploy/grafana-dashboard.json: a panel for every documented metric, only metrics we export."""

from __future__ import annotations

import json
import re
from typing import Any

from bridge.metrics import Metrics
from tests.dashboard.conftest import ROOT

DOCUMENTED_METRICS = {
    "bridge_ws_connections",
    "bridge_ws_heartbeat_rtt_seconds",
    "bridge_ws_heartbeat_timeouts_total",
    "bridge_engine_queue_depth",
    "bridge_engine_batch_size",
    "bridge_engine_requests_total",
    "bridge_engine_generated_tokens_total",
    "bridge_feishu_events_total",
}
_NAME = re.compile(r"\b((?:bridge|process|python)_[a-z_]+)")


def _dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())  # type: ignore[no-any-return]


def _referenced(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            names.update(_NAME.findall(target["expr"]))
    return names


def test_every_spec_metric_has_a_panel() -> None:
    names = _referenced(_dashboard())
    for metric in DOCUMENTED_METRICS:
        assert any(n == metric or n.startswith(metric + "_") for n in names), metric


def test_every_referenced_series_is_exported() -> None:
    # Families from the TYPE lines, so labelled series not yet observed count too.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    series: set[str] = set()
    for line in Metrics().render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            base = family.removesuffix("_total") if kind == "counter" else family
            series.update(base + suffix for suffix in suffixes.get(kind, ("",)))
    for name in _referenced(_dashboard()):
        assert name in series, f"{name} is not exported by bridge.metrics.Metrics"


def test_layout_is_sane() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
