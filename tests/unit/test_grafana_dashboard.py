"""deploy/grafana/lstm-hpo.json queries exactly the metrics GET /metrics exports: every
expression names only exported series, and every lstm_hpo family has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from service.metrics import PREFIX, app_collectors, exported_metric_names, request_histogram

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lstm-hpo.json"
#: A metric name in PromQL: not a label (followed by = or !=~), a function or a keyword.
_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")
_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*(?:=|!=|=~|!~))")


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _exprs(value)]
    if isinstance(node, list):
        return [e for item in node for e in _exprs(item)]
    return []


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_groupings)
    return {name for name in _NAME.findall(without_ranges) if name.startswith(f"{PREFIX}_")}


def test_every_dashboard_expression_uses_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metric_names(
        app_collectors(sessionmaker(), live_within_s=60, requests=request_histogram())
    )
    exprs = _exprs(dashboard["panels"])
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no lstm_hpo metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses {sorted(names - exported)}, not exported"
        used |= names
    # Each family (a histogram's three series are one) is on some panel.
    families = {_SUFFIX.sub("", n) for n in exported if n.startswith(f"{PREFIX}_")}
    unused = families - {_SUFFIX.sub("", n) for n in used}
    assert not unused, f"exported but on no panel: {sorted(unused)}"


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (route, le) (rate(lstm_hpo_x_bucket{route=~"/v1.*"}[5m])))'
        " / on(route) group_left max without (instance) (lstm_hpo_y)"
    )
    assert _metric_names(expr) == {"lstm_hpo_x_bucket", "lstm_hpo_y"}


def test_the_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lstm-hpo"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
