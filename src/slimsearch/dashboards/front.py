"""Pareto-front plot: data prepared by a pure function, drawn by another (Optuna's split)."""

from __future__ import annotations

import html
from typing import Mapping, NamedTuple, Optional, Sequence


class FrontInfo(NamedTuple):
    """What the front plot shows, ready to draw."""

    x_name: str
    y_name: str
    x_label: str
    y_label: str
    points: list[tuple[float, float, int, bool, str]]  # (x, y, trial, on_front, hover text)
    teacher: Optional[tuple[float, float]]
    step: list[tuple[float, float]]  # the 2-D front of (x, y) as a step line
    references: tuple = ()  # (x, y, name, hover text) of each reference run (a job's uniform baselines)


def _label(name: str, provenance: Mapping[str, str]) -> str:
    kind = provenance.get(name)
    return f"{name} ({kind})" if kind else name


def front_info(candidates: Sequence[Mapping], objectives: Mapping[str, str], *, front: set[int],
               teacher: Optional[Mapping[str, float]] = None, provenance: Mapping[str, str] = (),
               x_name: Optional[str] = None, y_name: Optional[str] = None,
               directions: Optional[Mapping[str, str]] = None,
               references: Mapping[str, Mapping[str, float]] = {}) -> FrontInfo:
    """``y_name`` (default: the first objective) against ``x_name`` (default: the second), front members marked.

    ``candidates`` are dicts with ``trial``, ``metrics`` and ``describe``;
    ``front`` holds the trial numbers on the front of all objectives. Axis labels and
    hover text say which figures are measured and which modelled. A metric that is not
    an objective (e.g. the latency on another profile) may be an axis when
    ``directions`` says whether it is maximised or minimised; candidates without a value
    for an axis are left out. ``references`` (name -> metrics: a job's uniform baselines) are
    drawn beside the candidates, named, and take no part in the front.
    """
    from slimsearch.search.pareto import pareto_front

    names = list(objectives)
    dirs = {**objectives, **(directions or {})}
    if len(names) < 2 and not directions:
        raise ValueError(f"a front plot needs two objectives, got {names}")
    y_name, x_name = y_name or names[0], x_name or names[1]
    for axis, name in (("x_name", x_name), ("y_name", y_name)):
        if name not in dirs:
            raise ValueError(f"{axis} must be one of {sorted(dirs)}, got {name!r}")
    if x_name == y_name:
        raise ValueError(f"x_name and y_name must differ, both are {x_name!r}")
    provenance = dict(provenance)
    shown = list(dict.fromkeys([y_name, x_name, *names]))
    points = []
    for c in candidates:
        m = c["metrics"]
        if m.get(x_name) is None or m.get(y_name) is None:
            continue
        hover = (f"trial {c['trial']}<br>" + "<br>".join(f"{_label(k, provenance)}: {m[k]:.4g}" for k in shown
                                                            if m.get(k) is not None)
                 + f"<br>{html.escape(c['describe'])}")
        points.append((m[x_name], m[y_name], c["trial"], c["trial"] in front, hover))
    idx = pareto_front([(p[0], p[1]) for p in points], [dirs[x_name], dirs[y_name]])
    step = sorted((points[i][0], points[i][1]) for i in idx)
    t = (teacher[x_name], teacher[y_name]) if teacher and teacher.get(x_name) is not None \
        and teacher.get(y_name) is not None else None
    refs = tuple((m[x_name], m[y_name], name, f"baseline {html.escape(name)}<br>" + "<br>".join(
        f"{_label(k, provenance)}: {m[k]:.4g}" for k in shown if m.get(k) is not None))
        for name, m in references.items() if m.get(x_name) is not None and m.get(y_name) is not None)
    return FrontInfo(x_name, y_name, _label(x_name, provenance), _label(y_name, provenance), points, t, step, refs)


def references_of(baselines: Sequence[Mapping]) -> dict[str, Mapping[str, float]]:
    """Name -> metrics of each entry of a job's ``baselines`` (front.json): the ``references`` of :func:`front_info`."""
    return {b["name"]: b["metrics"] for b in baselines}


def front_figure(info: FrontInfo):
    """A plotly figure of ``info``: dominated points faded, front members bold, 2-D front as steps."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for on_front, name, opacity in ((False, "dominated", 0.35), (True, "Pareto front (all objectives)", 1.0)):
        pts = [p for p in info.points if p[3] == on_front]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=name, opacity=opacity,
            text=[p[4] for p in pts], hoverinfo="text", marker={"size": 10 if on_front else 7},
        ))
    if info.step:
        fig.add_trace(go.Scatter(x=[s[0] for s in info.step], y=[s[1] for s in info.step], mode="lines",
                                 line={"shape": "hv", "dash": "dot"}, name=f"2-D front ({info.x_name}, {info.y_name})"))
    if info.references:
        fig.add_trace(go.Scatter(x=[r[0] for r in info.references], y=[r[1] for r in info.references],
                                 mode="markers+text", name="uniform baselines", text=[r[2] for r in info.references],
                                 textposition="top center", hovertext=[r[3] for r in info.references],
                                 hoverinfo="text", marker={"symbol": "diamond", "size": 11}))
    if info.teacher:
        fig.add_trace(go.Scatter(x=[info.teacher[0]], y=[info.teacher[1]], mode="markers", name="teacher",
                                 marker={"symbol": "star", "size": 14}))
    fig.update_layout(title=f"{info.y_label} against {info.x_label}", xaxis_title=info.x_label,
                      yaxis_title=info.y_label, template="plotly_white")
    return fig


def front_infos(candidates: Sequence[Mapping], objectives: Mapping[str, str], *, front: set[int],
                teacher: Optional[Mapping[str, float]] = None, provenance: Mapping[str, str] = (),
                references: Mapping[str, Mapping[str, float]] = {}) -> list[FrontInfo]:
    """One :func:`front_info` per other objective: the first objective against each of the rest."""
    return [front_info(candidates, objectives, front=front, teacher=teacher, provenance=provenance, x_name=x,
                       references=references) for x in list(objectives)[1:]]


def write_front_html(info: FrontInfo | Sequence[FrontInfo], path) -> None:
    """Write the figure (or one figure per info, one under another) as one self-contained HTML file
    that opens offline."""
    infos = [info] if isinstance(info, FrontInfo) else list(info)
    if len(infos) == 1:
        front_figure(infos[0]).write_html(str(path), include_plotlyjs=True, full_html=True)
        return
    parts = [front_figure(one).to_html(include_plotlyjs=(i == 0), full_html=False) for i, one in enumerate(infos)]
    title = html.escape(" | ".join(f"{one.y_name} against {one.x_name}" for one in infos))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>"
            + "".join(parts) + "</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
