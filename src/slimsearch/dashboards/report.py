"""One self-contained HTML report per job: fronts, hypervolume, choices, per-layer plans.

As in :mod:`slimsearch.dashboards.front`, pure functions turn a job's ``front.json``
into plain values (``*_info``) and others draw them (``*_figure``); tests check the
values. The page inlines plotly.js, so it opens offline, and it marks in its own DOM
whether every figure rendered and which script errors happened (``#report-status``),
which is what the headless-browser test reads.
"""

from __future__ import annotations

import html
import json
from itertools import combinations
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from slimsearch._io import atomic_write
from slimsearch.dashboards.front import FrontInfo, front_figure, front_info, references_of
from slimsearch.metric_names import TaskFamily
from slimsearch.search.pareto import MAX_SLICED_POINTS, Reference, hypervolume_reference, hypervolume_series
from slimsearch.spaces.choices import FULL_PRECISION, WEIGHT_METHODS, choice

REPORT_HTML = "report.html"
STATUS_ID = "report-status"


# ---------------------------------------------------------------- hypervolume


class HypervolumeInfo(NamedTuple):
    evaluations: list[int]
    values: list[float]
    reference: Reference
    baseline: Optional[list[float]]  # random search on the same job, when one was recorded
    baseline_label: str  # what the baseline is, or why there is none


def hypervolume_info(data: Mapping, baseline: Optional[Mapping] = None) -> Optional[HypervolumeInfo]:
    """Hypervolume after each evaluation of job ``data`` (a ``front.json``), and of ``baseline``
    (another job's ``front.json``, random search on the same objectives) measured in the same box.
    None when it is not computed (see :func:`hypervolume_series`)."""
    objectives = data["objectives"]
    reference = hypervolume_reference(objectives, data.get("teacher"), data["candidates"])
    values = hypervolume_series(data["candidates"], objectives, reference)
    if values is None:
        return None
    sampler = (data.get("sampler") or "").lower()
    if baseline is not None:
        if baseline["objectives"] != objectives:
            raise ValueError(f"the baseline job's objectives {baseline['objectives']} differ from {objectives}")
        base = hypervolume_series(baseline["candidates"], objectives, reference)
        label = f"random search: job {baseline.get('job')!r} ({len(base)} evaluations)"
    elif sampler == "random":
        base, label = None, "this job is itself random search"
    else:
        base, label = None, ("no random-search baseline recorded for this job (run the same job with "
                             "search.sampler: random: its report and `slimsearch report` then find it in the "
                             "job registry; or pass one with `slimsearch report JOB --baseline RANDOM_JOB`)")
    return HypervolumeInfo(list(range(1, len(values) + 1)), values, reference, base, label)


def hypervolume_figure(info: HypervolumeInfo):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=info.evaluations, y=info.values, mode="lines+markers", name="this job",
                             line={"shape": "hv"}))
    if info.baseline:
        fig.add_trace(go.Scatter(x=list(range(1, len(info.baseline) + 1)), y=info.baseline, mode="lines",
                                 name="random search", line={"shape": "hv", "dash": "dash"}))
    fig.update_layout(title=f"Hypervolume after each evaluation<br><sup>reference: {html.escape(info.reference.rule)}"
                            "</sup>",
                      xaxis_title="evaluations", yaxis_title="hypervolume (teacher units)", template="plotly_white")
    return fig


# ---------------------------------------------------------------- fronts


def _metric_first(data: Mapping) -> list[str]:
    """The objectives with the task metric first (``front.json`` stores them sorted by name)."""
    metric = data.get("metric")
    return sorted(data["objectives"], key=lambda n: n != metric)


def pair_front_infos(data: Mapping) -> list[FrontInfo]:
    """One 2-D front per pair of objectives, then the task metric against the latency on each
    device profile that is not an objective already."""
    objectives = data["objectives"]
    candidates, teacher = data["candidates"], data.get("teacher")
    front = {c["trial"] for c in data["front"]}
    provenance = {k: v for c in candidates for k, v in c["provenance"].items()}
    names = _metric_first(data)
    references = references_of(data.get("baselines", ()))  # a causal-LM job's uniform recipes
    infos = [front_info(candidates, objectives, front=front, teacher=teacher, provenance=provenance,
                        x_name=x, y_name=y, references=references) for y, x in combinations(names, 2)]
    metric = names[0]
    better = objectives[metric]  # its own direction: lower perplexity is better, higher accuracy
    extra = sorted({k for c in candidates for k in c["metrics"]
                    if k.startswith("latency_ms@") and k not in objectives})
    for x in extra:
        if any(c["metrics"].get(x) is not None for c in candidates):
            infos.append(front_info(candidates, objectives, front=front, teacher=teacher, provenance=provenance,
                                    x_name=x, y_name=metric, directions={x: "min", metric: better},
                                    references=references))
    return infos


class Front3DInfo(NamedTuple):
    names: tuple[str, str, str]
    points: list[tuple[float, float, float, bool, str]]  # x, y, z, on_front, hover


def front3d_info(data: Mapping) -> Optional[Front3DInfo]:
    """The first three objectives in 3-D, front members marked; None with fewer than three."""
    names = tuple(_metric_first(data)[:3])
    if len(names) < 3:
        return None
    front = {c["trial"] for c in data["front"]}
    pts = []
    for c in data["candidates"]:
        m = c["metrics"]
        if all(m.get(n) is not None for n in names):
            hover = f"trial {c['trial']}<br>{html.escape(c['describe'])}"
            pts.append((m[names[0]], m[names[1]], m[names[2]], c["trial"] in front, hover))
    return Front3DInfo(names, pts)


def front3d_figure(info: Front3DInfo):
    import plotly.graph_objects as go

    fig = go.Figure()
    for on_front, name, opacity in ((False, "dominated", 0.35), (True, "Pareto front", 1.0)):
        pts = [p for p in info.points if p[3] == on_front]
        fig.add_trace(go.Scatter3d(x=[p[0] for p in pts], y=[p[1] for p in pts], z=[p[2] for p in pts],
                                   mode="markers", name=name, opacity=opacity, text=[p[4] for p in pts],
                                   hoverinfo="text", marker={"size": 6 if on_front else 4}))
    fig.update_layout(title="3-D front", scene={"xaxis_title": info.names[0], "yaxis_title": info.names[1],
                                                "zaxis_title": info.names[2]}, template="plotly_white")
    return fig


# ---------------------------------------------------------------- choices


class Dimension(NamedTuple):
    label: str
    values: list[float]
    ticktext: Optional[list[str]]  # categories, when the values are their codes


class ParallelInfo(NamedTuple):
    dimensions: list[Dimension]
    color: list[float]  # the first objective
    color_name: str


def parallel_info(data: Mapping) -> Optional[ParallelInfo]:
    """Searched choices (params that vary) then objectives, one line per candidate. Categorical
    choices become codes with their names as tick labels. None without candidates."""
    candidates = sorted(data["candidates"], key=lambda c: c["trial"])
    if not candidates:
        return None
    objectives = _metric_first(data)
    params = list(dict.fromkeys(k for c in candidates for k in c["params"]))
    dims = []
    for p in params:
        vals = [c["params"].get(p) for c in candidates]
        if len({json.dumps(v) for v in vals}) < 2:
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            dims.append(Dimension(p, [float(v) for v in vals], None))
        else:
            cats = sorted({str(v) for v in vals})
            dims.append(Dimension(p, [float(cats.index(str(v))) for v in vals], cats))
    for o in objectives:
        dims.append(Dimension(o, [float("nan") if c["metrics"].get(o) is None else float(c["metrics"][o])
                                  for c in candidates], None))
    color = [float(c["metrics"].get(objectives[0]) or 0.0) for c in candidates]
    return ParallelInfo(dims, color, objectives[0])


def parallel_figure(info: ParallelInfo):
    import plotly.graph_objects as go

    dims = []
    for d in info.dimensions:
        dim = {"label": d.label, "values": d.values}
        if d.ticktext is not None:
            dim.update(tickvals=list(range(len(d.ticktext))), ticktext=d.ticktext)
        dims.append(dim)
    fig = go.Figure(go.Parcoords(dimensions=dims, line={"color": info.color, "colorscale": "Viridis",
                                                        "showscale": True,
                                                        "colorbar": {"title": {"text": info.color_name}}}))
    fig.update_layout(title="Choices against objectives (one line per candidate)", template="plotly_white")
    return fig


class LayerHeatmapInfo(NamedTuple):
    layers: list[str]
    members: list[str]  # "trial N", one row per front member
    weight_bits: list[list[float]]
    act_bits: list[list[float]]
    prune_ratio: list[list[float]]


def layer_heatmap_info(data: Mapping) -> Optional[LayerHeatmapInfo]:
    """Per-layer weight bits, activation bits and prune ratios of each front member; a layer a plan
    does not name is left as it is (32 bits, not pruned). None without front members."""
    front = sorted(data["front"], key=lambda c: c["trial"])
    if not front:
        return None
    layers = list(dict.fromkeys(name for c in front for name in c["plan"].get("layers", {})))
    if not layers:
        return None

    def grid(key: str, default: float) -> list[list[float]]:
        return [[float(c["plan"]["layers"].get(name, {}).get(key, default)) for name in layers] for c in front]

    return LayerHeatmapInfo(layers, [f"trial {c['trial']}" for c in front], grid("weight_bits", 32),
                            grid("act_bits", 32), grid("prune_ratio", 0.0))


def layer_heatmap_figure(info: LayerHeatmapInfo):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("weight bits", "activation bits", "prune ratio"))
    for col, (z, scale) in enumerate(((info.weight_bits, "Blues_r"), (info.act_bits, "Greens_r"),
                                      (info.prune_ratio, "Reds")), start=1):
        fig.add_trace(go.Heatmap(z=z, x=info.layers, y=info.members, colorscale=scale, showscale=False,
                                 text=[[f"{v:g}" for v in row] for row in z], texttemplate="%{text}",
                                 hovertemplate="%{y}, %{x}: %{z}<extra></extra>"), row=1, col=col)
    fig.update_layout(title="Per-layer plan of each front member", template="plotly_white",
                      height=max(300, 80 + 40 * len(info.members)))
    return fig


# A causal LM's linear groups: how each is rounded (colour codes of the method panel, in this order).
FLOAT, SMOOTHQUANT = "float", "smoothquant"
LLM_METHODS = (FLOAT, *WEIGHT_METHODS, SMOOTHQUANT)
SMOOTHQUANT_ACT_BITS = 8  # int8 inputs per token


class LLMHeatmapInfo(NamedTuple):
    layers: list[str]  # linear groups (``qkv``, ...), then per-block keys (``"3.down"``)
    members: list[str]  # "trial N" per front member, then "baseline <name>" per uniform recipe
    weight_bits: list[list[int]]  # per member and layer; 32: left in float
    kv_bits: list[int]  # per member: the KV cache's bits (32: the teacher's float cache)
    head_bits: list[int]  # per member: the output projection's bits (32: float)
    group_size: list[list[Optional[int]]]  # per member and layer; 0: per channel; None: float weights
    method: list[list[str]]  # per member and layer, one of LLM_METHODS or "<method>+smoothquant"


def _block_order(name: str) -> int:
    """-1 for a group key (``"down"``), else the block of a per-block key (``"3.down"``)."""
    block = name.partition(".")[0]
    return int(block) if block.isdigit() else -1


def llm_heatmap_info(data: Mapping) -> Optional[LLMHeatmapInfo]:
    """Per-layer weight bits, group size and method of a causal-LM job's front members and of its
    baselines (the uniform recipes), with each one's KV-cache and output bits; None when no plan names a layer.

    As the decoder methods apply a plan: a per-block key (``"3.down"``) sets its block's weight bits
    over its group's key; group size and rounding method are model-wide (the group size is the first
    quantized layer's); SmoothQuant's int8 inputs (``act_bits`` 8) are chosen per group.
    """
    rows = [(f"trial {c['trial']}", c["plan"]) for c in sorted(data["front"], key=lambda c: c["trial"])]
    rows += [(f"baseline {b['name']}", b["plan"]) for b in data.get("baselines", ())]
    layers = sorted(dict.fromkeys(name for _, plan in rows for name in plan.get("layers", {})), key=_block_order)
    if not layers:
        return None
    default_method = choice("weight_method").default  # an older plan may lack the field
    bits, sizes, methods = [], [], []
    for _, plan in rows:
        named = plan.get("layers", {})
        quantized = [lp for lp in named.values() if lp.get("weight_bits", FULL_PRECISION) < FULL_PRECISION]
        size = quantized[0].get("group_size", 0) if quantized else None
        row_bits, row_sizes, row_methods = [], [], []
        for name in layers:
            group = name.partition(".")[2] if _block_order(name) >= 0 else name
            own = named.get(name) or named.get(group) or {}
            b = int(own.get("weight_bits", FULL_PRECISION))
            method = plan.get("weight_method", default_method) if b < FULL_PRECISION else FLOAT
            if named.get(group, {}).get("act_bits", FULL_PRECISION) == SMOOTHQUANT_ACT_BITS:
                method = SMOOTHQUANT if method == FLOAT else f"{method}+{SMOOTHQUANT}"
            row_bits.append(b)
            row_sizes.append(size if b < FULL_PRECISION else None)
            row_methods.append(method)
        bits.append(row_bits)
        sizes.append(row_sizes)
        methods.append(row_methods)
    kv, head = ([int(plan.get(name, FULL_PRECISION)) for _, plan in rows] for name in ("kv_bits", "head_bits"))
    return LLMHeatmapInfo(layers, [name for name, _ in rows], bits, kv, head, sizes, methods)


def llm_heatmap_figure(info: LLMHeatmapInfo):
    """Three panels sharing the rows: weight bits (``head``: output projection, ``kv``), group size, method."""
    import math

    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("weight bits (head: output projection; kv: KV cache; 32: float)",
                                        "group size", "method"))
    bits = [row + [head, kv] for row, head, kv in zip(info.weight_bits, info.head_bits, info.kv_bits)]
    # colour by log2(bits), so 2, 3, 4 and 8 bits differ as much as 8 and 32 do
    traces = [(info.layers + ["head", "kv"], [[math.log2(b) for b in row] for row in bits],
               [[str(b) for b in row] for row in bits], {"colorscale": "Blues_r", "zmin": 1, "zmax": 6})]
    sizes = sorted({s for row in info.group_size for s in row if s is not None}, key=lambda s: (s == 0, s))
    traces.append((info.layers, [[math.nan if s is None else sizes.index(s) for s in row] for row in info.group_size],
                   [["" if s is None else "per channel" if s == 0 else str(s) for s in row] for row in info.group_size],
                   {"colorscale": "Purples", "zmin": -1, "zmax": max(len(sizes), 2)}))  # light: text stays readable
    colours = ["#f2f2f2", *qualitative.Pastel[:len(LLM_METHODS) - 1]]
    steps = [[edge, c] for i, c in enumerate(colours) for edge in (i / len(colours), (i + 1) / len(colours))]
    code = [[LLM_METHODS.index(m.rpartition("+")[2]) for m in row] for row in info.method]  # "+smoothquant" wins
    traces.append((info.layers, code, info.method, {"colorscale": steps, "zmin": -0.5, "zmax": len(colours) - 0.5}))
    for col, (x, z, text, colour) in enumerate(traces, start=1):
        fig.add_trace(go.Heatmap(z=z, x=x, y=info.members, showscale=False, text=text, texttemplate="%{text}",
                                 hovertemplate="%{y}, %{x}: %{text}<extra></extra>", **colour), row=1, col=col)
    fig.update_yaxes(autorange="reversed")  # front members from the top, the baselines below them
    fig.update_layout(title="Per-layer weight bits, group size and method of each front member and baseline",
                      template="plotly_white", height=max(300, 80 + 40 * len(info.members)))
    return fig


class PredictedInfo(NamedTuple):
    profile: str
    predicted: list[float]  # latency_ms@<profile>, modelled
    measured: list[float]  # latency_ms@local, timed on this machine
    hover: list[str]


def predicted_infos(data: Mapping) -> list[PredictedInfo]:
    """Modelled latency on each profile of this machine (named ``local-*``, as ``slimsearch hw profile``
    names them) against the latency measured here, per candidate; empty when the job has none."""
    out = []
    profiles = sorted({k.split("@", 1)[1] for c in data["candidates"] for k in c["metrics"]
                       if k.startswith("latency_ms@local-")})
    for p in profiles:
        rows = [(c["metrics"][f"latency_ms@{p}"], c["metrics"]["latency_ms@local"],
                 f"trial {c['trial']}<br>{html.escape(c['describe'])}") for c in data["candidates"]
                if c["metrics"].get(f"latency_ms@{p}") is not None and c["metrics"].get("latency_ms@local") is not None]
        if rows:
            out.append(PredictedInfo(p, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    return out


def predicted_figure(info: PredictedInfo):
    import plotly.graph_objects as go

    hi = max(info.predicted + info.measured)
    fig = go.Figure([go.Scatter(x=info.predicted, y=info.measured, mode="markers", name="candidates",
                                text=info.hover, hoverinfo="text"),
                     go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="predicted = measured",
                                line={"dash": "dot"})])
    fig.update_layout(title=f"latency_ms: predicted on profile {info.profile} (modelled) against measured here",
                      xaxis_title=f"latency_ms@{info.profile} (modelled)", yaxis_title="latency_ms@local (measured)",
                      template="plotly_white", height=450)
    return fig


# ---------------------------------------------------------------- page


class Section(NamedTuple):
    title: str
    figure: Optional[object]  # a plotly figure, or None when the data do not exist
    note: str


def report_sections(data: Mapping, baseline: Optional[Mapping] = None) -> list[Section]:
    """The report's sections, in order; a section whose data do not exist says why instead."""
    fronts = []
    if len(data["objectives"]) >= 2 and data["candidates"]:
        for info in pair_front_infos(data):
            fig = front_figure(info)
            fig.update_layout(height=450)
            fronts.append(Section(f"{info.y_name} against {info.x_name}", fig,
                                  "faded: dominated in all objectives; dotted steps: the 2-D front of this pair"))
    else:
        fronts.append(Section("Fronts", None, "fewer than two objectives or no completed candidate"))
    hv = hypervolume_info(data, baseline) if data["candidates"] else None
    if hv is not None:
        hv_fig = hypervolume_figure(hv)
        hv_fig.update_layout(height=400)
        hv_section = Section("Hypervolume", hv_fig, hv.baseline_label if not hv.baseline
                             else f"dashed: {hv.baseline_label}")
    else:
        hv_section = Section("Hypervolume", None, "not computed: needs two or more objectives, completed "
                             f"candidates, and at most {MAX_SLICED_POINTS} of them with four or more objectives")
    sections = [fronts[0], hv_section, *fronts[1:]]  # the headline front and the hypervolume first
    info3 = front3d_info(data)
    if info3 is not None:
        sections.append(Section("3-D front", front3d_figure(info3),
                                f"first three objectives: {', '.join(info3.names)}"))
    par = parallel_info(data)
    sections.append(Section("Choices", parallel_figure(par) if par else None, "colour: " + (par.color_name if par
                                                                                          else "no candidates")))
    if TaskFamily(data.get("family", TaskFamily.CLASSIFICATION)) is TaskFamily.CAUSAL_LM:
        llm = llm_heatmap_info(data)
        sections.append(Section("Per-layer plans", llm_heatmap_figure(llm) if llm else None,
                                "rows: front members, then the baselines (uniform recipes)" if llm
                                else "no front member or baseline names a layer"))
    else:
        heat = layer_heatmap_info(data)
        sections.append(Section("Per-layer plans", layer_heatmap_figure(heat) if heat else None,
                                "rows: front members" if heat else "no front member names a layer"))
    predicted = predicted_infos(data)
    for info in predicted:
        sections.append(Section(f"Predicted against measured latency ({info.profile})", predicted_figure(info),
                                "batch 1; the profile was measured on this machine by `slimsearch hw profile`"))
    if not predicted:
        sections.append(Section("Predicted against measured latency", None,
                                "not drawn: the job has no profile of this machine (a `local-*` profile written "
                                "by `slimsearch hw profile`) to compare the measured latency with"))
    return sections


_PAGE_HEAD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script>
window.__reportErrors = [];
window.addEventListener("error", function (e) {{ window.__reportErrors.push(String(e.message || e)); }});
window.addEventListener("unhandledrejection", function (e) {{ window.__reportErrors.push(String(e.reason)); }});
</script>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}} .note{{color:#555;font-size:90%}}
.fig{{min-height:420px}}</style>
</head><body>
"""

_PAGE_TAIL = """<div id="{status}" data-state="pending"></div>
<script>
(function () {{
  var figures = {figures};
  var status = document.getElementById("{status}");
  var done = Promise.all(figures.map(function (f) {{
    return Plotly.newPlot(f.id, f.figure.data, f.figure.layout, {{responsive: true, displaylogo: false}});
  }}));
  done.then(function () {{
    var traces = [];
    figures.forEach(function (f) {{
      var div = document.getElementById(f.id);
      (div._fullData || []).forEach(function (t) {{ traces.push(f.id + ":" + (t.name || t.type)); }});
    }});
    status.setAttribute("data-traces", JSON.stringify(traces));
    status.setAttribute("data-errors", JSON.stringify(window.__reportErrors));
    status.setAttribute("data-state", window.__reportErrors.length ? "errors" : "rendered");
  }}).catch(function (e) {{
    window.__reportErrors.push(String(e));
    status.setAttribute("data-errors", JSON.stringify(window.__reportErrors));
    status.setAttribute("data-state", "errors");
  }});
}})();
</script>
</body></html>
"""


def report_html(data: Mapping, baseline: Optional[Mapping] = None) -> str:
    """The report page of job ``data`` (its ``front.json``) as one offline HTML string."""
    from plotly.offline import get_plotlyjs

    sections = report_sections(data, baseline)
    title = f"slimsearch report: {data.get('job', 'job')}"
    n, k = len(data["candidates"]), len(data["front"])
    parts = [_PAGE_HEAD.format(title=html.escape(title)),
             f"<h1>{html.escape(title)}</h1><p>{k} front members of {n} candidates; objectives: "
             + ", ".join(f"{html.escape(o)} ({d})" for o, d in data["objectives"].items())
             + ". Figures labelled <i>modelled</i> are predicted from device profiles, not timed there.</p>",
             f"<script>{get_plotlyjs()}</script>"]
    figures = []
    for i, s in enumerate(sections):
        parts.append(f"<h2>{html.escape(s.title)}</h2><p class=\"note\">{html.escape(s.note)}</p>")
        if s.figure is not None:
            fid = f"fig-{i}"
            parts.append(f"<div class=\"fig\" id=\"{fid}\"></div>")
            figures.append(f'{{"id": "{fid}", "figure": {s.figure.to_json()}}}')
    figures_js = "[" + ",\n".join(figures) + "]"
    parts.append(_PAGE_TAIL.format(status=STATUS_ID, figures=figures_js.replace("</", "<\\/")))
    return "".join(parts)


def write_report(job_dir: Path, out: Optional[Path] = None, baseline: Optional[Path] = None) -> Path:
    """Write ``report.html`` for the job in ``job_dir`` (its ``front.json``, and ``job.json`` for the
    sampler); ``baseline`` is another job folder whose candidates are random search."""
    job_dir = Path(job_dir)
    data = json.loads((job_dir / "front.json").read_text())
    state_path = job_dir / "job.json"
    if state_path.exists() and "sampler" not in data:
        data = {**data, "sampler": json.loads(state_path.read_text())["spec"]["search"].get("sampler")}
    base = json.loads((Path(baseline) / "front.json").read_text()) if baseline else None
    path = Path(out) if out else job_dir / REPORT_HTML
    atomic_write(path, report_html(data, base))
    return path
