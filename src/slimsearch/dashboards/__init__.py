"""Plotly dashboards: pure functions prepare the data, others draw it."""

from __future__ import annotations

from slimsearch.dashboards.front import FrontInfo, front_figure, front_info, write_front_html

__all__ = ["FrontInfo", "front_figure", "front_info", "write_front_html"]
