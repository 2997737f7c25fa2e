"""The report: PNG figures and one self-contained ``index.html`` (images inlined as data URIs).

For each model in the database:

- accuracy vs length per task, one line per method, the model's trained length marked and
  the effective-length threshold drawn;
- per task with depths, a depth × length heatmap per method (Kamradt's NIAH picture);
- the effective context length of each method on each task (rule in ``summary.py``);
- prefill time and peak memory vs length per method (cells that reused no cached prefix);
- perplexity next to retrieval accuracy for each method, on twin axes, because a method can
  keep perplexity flat while retrieval collapses;
- a sortable, filterable table of every cell.

The figures use matplotlib's object API (no pyplot global state), so a report can be made
inside any program.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from longreach.bench.grid import format_length
from longreach.bench.store import Cell, ResultStore
from longreach.bench.summary import (
    DEFAULT_THRESHOLD,
    Series,
    check_threshold,
    depth_grid,
    median,
    series_of,
    summarize,
    task_name,
)
from longreach.errors import LongreachError


@dataclass
class Report:
    index: Path
    images: list[Path]
    cells: int


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "x"


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(series: list[Series]) -> dict[Series, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(series)}


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([format_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")


def _trained_line(ax, trained: int | None, lengths: list[int]) -> None:
    if trained and lengths:
        ax.axvline(trained, color="0.3", linestyle="--", linewidth=1)
        ax.text(trained, 1.0, " trained length", transform=ax.get_xaxis_transform(),
                va="top", ha="left", fontsize=8, color="0.3")  # fmt: skip
        lo, hi = min(lengths + [trained]), max(lengths + [trained])
        ax.set_xlim(lo / 1.3, hi * 1.3)
        if trained not in lengths:
            ticks = sorted(lengths + [trained])
            ax.set_xticks(ticks)
            ax.set_xticklabels([format_length(n) for n in ticks])


def _plain_log_ticks(axis) -> None:
    """Tick labels like 0.2, 5, 50 instead of 2×10⁻¹ on a log axis.

    Over a range of 3× or more only the ticks at 1, 2 and 5 of a decade are labelled:
    labelling every minor tick made 0.07, 0.08 and 0.09 overlap.
    """
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: object) -> str:
        if value <= 0:
            return ""
        lo, hi = sorted(axis.get_view_interval())
        lead = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        if lo > 0 and hi / lo < 3 or lead in (1.0, 2.0, 5.0):
            return f"{value:g}"
        return ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def _legend_outside(ax) -> None:
    """The legend right of the plot, where it cannot hide a point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.images: list[Path] = []

    def save(self, fig, name: str) -> tuple[str, str]:
        path = self.out / f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        data = buffer.getvalue()
        path.write_bytes(data)
        self.images.append(path)
        return path.name, "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(writer_result: tuple[str, str], alt: str) -> str:
    name, uri = writer_result
    return (
        f'<figure><img src="{uri}" alt="{html.escape(alt)}">'
        f'<figcaption>{html.escape(alt)} · <a href="{html.escape(name)}">{html.escape(name)}</a>'
        "</figcaption></figure>"
    )


def write_report(db: str | Path, out: str | Path, threshold: float = DEFAULT_THRESHOLD) -> Report:
    """Render the report of every cell in ``db`` into the folder ``out``."""
    check_threshold(threshold)
    with ResultStore(db, create=False) as store:
        cells = store.cells(include_prompt=False)
        runs = store.runs()
    if not cells:
        raise LongreachError(
            f"{db} holds no finished cells yet; run `longreach bench --db {db}` first."
        )
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LongreachError(
            f"cannot create the report folder {out} ({exc.strerror or exc})."
        ) from None
    writer = _Writer(out)
    by_model: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        by_model[(cell.model, cell.model_fingerprint)].append(cell)
    sections = [
        _model_section(writer, model, fp, model_cells, threshold)
        for (model, fp), model_cells in by_model.items()
    ]
    page = _page(sections, cells, runs, Path(db), threshold)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return Report(index=index, images=writer.images, cells=len(cells))


# --------------------------------------------------------------------------- one model


def _model_section(
    writer: _Writer, model: str, fp: str, cells: list[Cell], threshold: float
) -> str:
    slug = _slug(f"{Path(model).name}-{fp[:6]}")
    trained = next((c.trained_length for c in cells if c.trained_length), None)
    series = list(dict.fromkeys(series_of(c) for c in cells))
    show_format = len({s.prompt_format for s in series}) > 1
    colors = _colors(series)
    rows = summarize(cells, threshold)
    lengths = sorted({c.length for c in cells})
    parts = [
        f'<section id="{slug}"><h2>{html.escape(model)} '
        f"<small>fingerprint {html.escape(fp)} · trained length "
        f"{trained if trained else 'unknown'}</small></h2>"
    ]
    acc_tasks = list(dict.fromkeys(c.task for c in cells if c.metric == "accuracy"))
    ppl_tasks = list(dict.fromkeys(c.task for c in cells if c.metric == "perplexity"))

    parts.append("<h3>Effective context length</h3>")
    parts.append(_effective_table(rows, acc_tasks, show_format, threshold))

    if acc_tasks:
        parts.append("<h3>Accuracy vs length</h3><div class='grid'>")
        for task in acc_tasks:
            fig = _accuracy_figure(rows, task, colors, show_format, lengths, trained, threshold)
            parts.append(
                _img(
                    writer.save(fig, f"{slug}-accuracy-{_slug(task)}"),
                    f"{task}: accuracy vs length",
                )
            )
        parts.append("</div>")

    grids = depth_grid(cells)
    if grids:
        parts.append("<h3>Depth × length</h3><div class='grid'>")
        for task in acc_tasks:
            task_series = [s for s in series if (s, task) in grids]
            if not task_series:
                continue
            fig = _heatmaps(task, task_series, grids, show_format)
            parts.append(
                _img(
                    writer.save(fig, f"{slug}-heatmap-{_slug(task)}"),
                    f"{task}: score by depth and length",
                )
            )
        parts.append("</div>")

    parts.append("<h3>Cost vs length</h3>")
    cost = _cost_figure(cells, series, colors, show_format, lengths, trained)
    if cost is None:
        parts.append("<p class='note'>No cell has timing data.</p>")
    else:
        parts.append(
            _img(writer.save(cost, f"{slug}-cost"), "prefill time and peak memory vs length")
        )

    parts.append("<h3>Perplexity next to retrieval</h3>")
    if not ppl_tasks:
        parts.append(
            "<p class='note'>No perplexity cells: run <code>--task perplexity</code> with the same "
            "methods to see whether perplexity tracks retrieval (it often stays flat while "
            "retrieval collapses).</p>"
        )
    else:
        fig = _ppl_vs_accuracy(cells, series, show_format, lengths, trained, threshold)
        parts.append(
            _img(
                writer.save(fig, f"{slug}-perplexity-vs-retrieval"),
                "perplexity (right axis) and retrieval accuracy (left axis) per method",
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


def _accuracy_figure(rows, task, colors, show_format, lengths, trained, threshold):
    """Mean accuracy vs length of every method on one task (the summary table's numbers)."""
    fig = _figure(7.4, 4.0)
    ax = fig.add_subplot()
    for row in rows:
        if row.task != task:
            continue
        xs = sorted(row.by_length)
        ax.plot(xs, [row.by_length[x][0] for x in xs], marker="o",
                color=colors[row.series], label=row.series.label(show_format))  # fmt: skip
    ax.axhline(threshold, color="0.6", linestyle=":", linewidth=1)
    _length_axis(ax, lengths)
    _trained_line(ax, trained, lengths)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("accuracy (mean)")
    ax.set_title(task_name(task))
    _legend_outside(ax)
    return fig


def _effective_table(rows, tasks: list[str], show_format: bool, threshold: float) -> str:
    if not tasks:
        return "<p class='note'>No retrieval task in this database.</p>"
    series = list(dict.fromkeys(r.series for r in rows))
    lookup = {(r.series, r.task): r for r in rows}
    head = "".join(f"<th>{html.escape(task_name(t))}</th>" for t in tasks)
    body = []
    for s in series:
        cells_html = []
        for t in tasks:
            row = lookup.get((s, t))
            if row is None:
                cells_html.append("<td>–</td>")
            elif row.effective is None:
                shortest = format_length(min(row.by_length))
                cells_html.append(f"<td class='bad'>&lt; {shortest}</td>")
            else:
                longest = max(row.by_length)
                mark = "≥ " if row.effective == longest else ""
                cells_html.append(f"<td class='good'>{mark}{format_length(row.effective)}</td>")
        body.append(f"<tr><th>{html.escape(s.label(show_format))}</th>{''.join(cells_html)}</tr>")
    return (
        f"<table class='eff'><thead><tr><th>method</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        f"<p class='note'>The largest measured length at which the mean accuracy, and the mean "
        f"accuracy at every shorter measured length, is at least {threshold:.0%} (RULER's rule "
        "with a fixed threshold). “≥” marks a method that never fell below it in the lengths "
        "measured; “&lt;” one that is below it already at the shortest.</p>"
    )


def _heatmaps(task: str, task_series: list[Series], grids, show_format: bool):
    n = len(task_series)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols + 0.8, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for i, s in enumerate(task_series):
        ax = axes[i // cols][i % cols]
        grid = grids[(s, task)]
        depths = sorted({d for d, _ in grid})
        lengths = sorted({n for _, n in grid})
        matrix = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.0%}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("needle depth")
        ax.set_title(s.label(show_format), fontsize=10)
        for r, row in enumerate(matrix):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.suptitle(task_name(task))
    return fig


def _cost_figure(cells, series, colors, show_format, lengths, trained):
    groups: dict[tuple[Series, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.shared_prefix_tokens == 0 and cell.prefill_s is not None:
            groups[(series_of(cell), cell.length)].append(cell)
    if not groups:
        return None
    fig = _figure(11, 3.8)
    ax_time, ax_mem = fig.subplots(1, 2)
    mem_kinds = {c.mem_kind for c in cells if c.mem_kind}
    for s in series:
        xs = sorted(n for (t, n) in groups if t == s)
        if not xs:
            continue
        label = s.label(show_format)
        ax_time.plot(xs, [median(c.prefill_s for c in groups[(s, n)]) for n in xs],
                     marker="o", color=colors[s], label=label)  # fmt: skip
        mem = [median(c.peak_mem_bytes for c in groups[(s, n)]) for n in xs]
        ax_mem.plot(xs, [m / 2**20 if m is not None else float("nan") for m in mem],
                    marker="o", color=colors[s], label=label)  # fmt: skip
    for ax in (ax_time, ax_mem):
        _length_axis(ax, lengths)
        _trained_line(ax, trained, lengths)
    _legend_outside(ax_mem)
    ax_time.set_yscale("log")
    _plain_log_ticks(ax_time.yaxis)
    ax_time.set_ylabel("prefill seconds (median)")
    ax_time.set_title("prefill time")
    kind = ", ".join(sorted(mem_kinds)) or "peak memory"
    ax_mem.set_ylabel(f"peak memory, MiB ({kind})")
    ax_mem.set_title("peak memory")
    return fig


def _ppl_vs_accuracy(cells, series, show_format, lengths, trained, threshold):
    acc: dict[tuple[Series, int], list[float]] = defaultdict(list)
    ppl: dict[tuple[Series, int], list[float]] = defaultdict(list)
    for cell in cells:
        if cell.score is None:
            continue
        target = ppl if cell.metric == "perplexity" else acc
        target[(series_of(cell), cell.length)].append(cell.score)
    shown = [s for s in series if any(k[0] == s for k in ppl)]
    # Means, as in the summary table, and one perplexity range for every panel: a flat line
    # must look flat next to a steep one.
    ppl_mean = {k: statistics.fmean(v) for k, v in ppl.items() if k[0] in shown}
    lo, hi = min(ppl_mean.values()), max(ppl_mean.values())
    cols = min(len(shown), 3)
    rows = math.ceil(len(shown) / cols)
    fig = _figure(4.6 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, s in enumerate(shown):
        ax = axes[i // cols][i % cols]
        xs_acc = sorted(n for (t, n) in acc if t == s)
        if xs_acc:
            ax.plot(xs_acc, [sum(acc[(s, n)]) / len(acc[(s, n)]) for n in xs_acc],
                    marker="o", color="tab:blue", label="retrieval accuracy")  # fmt: skip
        ax.set_ylim(-0.03, 1.05)
        ax.set_ylabel("retrieval accuracy", color="tab:blue")
        ax.axhline(threshold, color="0.7", linestyle=":", linewidth=1)
        _length_axis(ax, lengths)
        _trained_line(ax, trained, lengths)
        twin = ax.twinx()
        xs_ppl = sorted(n for (t, n) in ppl if t == s)
        twin.plot(xs_ppl, [ppl_mean[(s, n)] for n in xs_ppl], marker="s",
                  color="tab:red", label="perplexity")  # fmt: skip
        twin.set_yscale("log")
        twin.set_ylim(lo / 1.15, hi * 1.15)
        _plain_log_ticks(twin.yaxis)
        twin.set_ylabel("perplexity (mean, log)", color="tab:red")
        ax.set_title(s.label(show_format), fontsize=10)
    for j in range(len(shown), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    return fig


# --------------------------------------------------------------------------- page

_COLUMNS = [
    ("model", "model"), ("method", "method"), ("task", "task"), ("prompt", "prompt_format"),
    ("length", "length"), ("depth", "depth"), ("seed", "seed"), ("#", "idx"),
    ("tokens", "context_tokens"), ("score", "score"), ("expected", "expected"),
    ("output", "output"), ("prefill s", "prefill_s"), ("decode tok/s", "decode_tok_s"),
    ("peak MiB", "peak_mem_bytes"), ("shared", "shared_prefix_tokens"),
]  # fmt: skip


def _cell_value(cell: Cell, attr: str) -> tuple[str, str]:
    """(text shown, sort key) of one table cell."""
    value = getattr(cell, attr)
    if attr == "model":
        value = Path(str(value)).name
    if attr == "expected":
        text = ", ".join(value)
        return text, text
    if value is None:
        return "", ""
    if attr == "peak_mem_bytes":
        return f"{value / 2**20:.0f}", str(value)
    if isinstance(value, float):
        shown = f"{value:.3f}" if attr in ("prefill_s", "score") else f"{value:.3g}"
        if attr == "depth":
            shown = f"{value:g}"
        return shown, repr(value)
    return str(value), str(value)


def _cells_table(cells: list[Cell]) -> str:
    numeric = {
        "length", "depth", "seed", "idx", "context_tokens", "score", "prefill_s",
        "decode_tok_s", "peak_mem_bytes", "shared_prefix_tokens",
    }  # fmt: skip
    head = "".join(
        f"<th data-type='{'num' if attr in numeric else 'text'}'>{html.escape(label)}</th>"
        for label, attr in _COLUMNS
    )
    body = []
    for cell in cells:
        tds = []
        for _, attr in _COLUMNS:
            shown, key = _cell_value(cell, attr)
            if attr == "output" and len(shown) > 120:
                shown = shown[:117] + "…"
            tds.append(f"<td data-v='{html.escape(key, quote=True)}'>{html.escape(shown)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (
        "<input id='filter' type='search' placeholder='filter rows (e.g. yarn, niah, 8192)'>"
        f"<table id='cells' class='cells'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{margin-bottom:0.2em} h2 small{font-weight:normal;color:#666;font-size:0.6em}
section{border-top:2px solid #ddd;margin-top:2em}
.grid{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.8em;color:#555}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
table.eff td{text-align:center;font-weight:600} td.good{background:#e6f4ea} td.bad{background:#fce8e6}
table.cells th{cursor:pointer;background:#f5f5f5;position:sticky;top:0}
table.cells th.asc::after{content:' ▲'} table.cells th.desc::after{content:' ▼'}
.note{color:#555;font-size:0.9em;max-width:70em} #filter{margin:0.5em 0;padding:4px;width:30em}
code{background:#f3f3f3;padding:0 3px}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('cells');
  if(table){
    var heads=table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads,function(th,col){
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('asc');
        Array.prototype.forEach.call(heads,function(h){h.classList.remove('asc','desc');});
        th.classList.add(asc?'asc':'desc');
        var num=th.dataset.type==='num';
        var rows=Array.prototype.slice.call(table.tBodies[0].rows);
        rows.sort(function(a,b){
          var x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
          if(num){x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y);}
          return (x<y?-1:x>y?1:0)*(asc?1:-1);
        });
        rows.forEach(function(r){table.tBodies[0].appendChild(r);});
      });
    });
    var filter=document.getElementById('filter');
    filter.addEventListener('input',function(){
      var q=filter.value.toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
        r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';
      });
    });
  }
  window.addEventListener('load',function(){
    var imgs=document.images, ok=0, shrunk=0;
    for(var i=0;i<imgs.length;i++){
      if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}
      if(imgs[i].clientWidth<imgs[i].naturalWidth){shrunk++;}
    }
    document.body.setAttribute('data-images-loaded', ok+'/'+imgs.length);
    document.body.setAttribute('data-images-shrunk', String(shrunk));
  });
})();
"""


def _page(
    sections: list[str], cells: list[Cell], runs: list[dict], db: Path, threshold: float
) -> str:
    versions = runs[-1]["versions"] if runs else {}
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform")
    n_models = len({c.model_fingerprint for c in cells})
    intro = (
        f"<p>{len(cells)} cells from <code>{html.escape(str(db))}</code> · {n_models} model(s) · "
        f"{len(runs)} run(s) · generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))}"
        f"<br><small>{html.escape(version_text)}</small></p>"
        "<p class='note'>Scores are means over samples (and depths); lengths are counted in each "
        "model's own tokens. Accuracy is in [0, 1]; perplexity is exp(mean loss) of the same "
        "last tokens at every length. Prefill time and peak memory come from cells that reused "
        "no cached prefix. Peak memory is the process's peak RSS on CPU (weights included) and "
        "CUDA's max allocated memory on a GPU.</p>"
    )
    config_json = html.escape(json.dumps([r["config"] for r in runs[-5:]], indent=1, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>longreach report</title><style>{_STYLE}</style></head>
<body>
<h1>longreach report</h1>
{intro}
{"".join(sections)}
<section><h2>Every cell</h2>
<p class='note'>Click a column header to sort; type to filter. Prompts are in the database
(<code>longreach export --db {html.escape(str(db))} --out cells.jsonl --prompts</code>).</p>
{_cells_table(cells)}
</section>
<details><summary>Configuration of the latest runs</summary><pre>{config_json}</pre></details>
<script>{_SCRIPT}</script>
</body></html>
"""
