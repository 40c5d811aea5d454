"""The report as one self-contained HTML page: inline CSS (report.css), every image embedded, no external URL."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

from qsched_search._version import __version__
from qsched_search.report.figures import heatmap_png, overrides_png, pareto_png
from qsched_search.report.model import Report, _text_colour
from qsched_search.report.text import (_column_title, _failures, _front_rows, _headline_facts, _image_grid,
                                       _image_metrics, _provenance)
from qsched_search.resources import REPORT_CSS
from qsched_search.results.layout import ResultsDir
from qsched_search.results.assignment import brief_key, parse_schedule_key, step_levels

__all__ = ["render_html"]

# Figures are rendered at 150 dpi for sharp text on high-density screens and shown at ~100 dpi, matplotlib's size.
_FIGURE_SCALE = 100 / 150


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img_tag(data: bytes, alt: str, cls: str = "plot", scale: float = 1.0) -> str:
    """An embedded PNG; `scale` < 1 shows a high-dpi figure at its intended size instead of blowing it up."""
    size = ""
    if scale != 1.0 and data[12:16] == b"IHDR":
        width = int.from_bytes(data[16:20], "big")
        size = f' style="width:{round(width * scale)}px"'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}"{size} src="data:image/png;base64,{b64}">'


def _mini_schedule(report: Report, schedule: str) -> str:
    cells = "".join(
        f'<i title="step {i}: {_e(lvl)}" style="background:{report.colours.get(lvl, "#999")}"></i>'
        for i, lvl in enumerate(step_levels(parse_schedule_key(schedule)))
    )
    return f'<span class="mini">{cells}</span> <span class="mono" title="{_e(schedule)}">{_e(brief_key(schedule))}</span>'


def _small_image(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.width < 128
    except Exception:  # an unreadable PNG still embeds; only the scaling hint is lost
        return False


def render_html(report: Report) -> str:
    """One self-contained HTML page: inline CSS, every image base64-embedded, no external URL."""
    s = report.schedule
    rd = ResultsDir(report.results.root)
    parts: list[str] = []
    model = (s or {}).get("model", {}).get("id") or (report.results.manifest or {}).get("model") or "unknown model"
    created = (s or {}).get("provenance", {}).get("created") or (report.results.manifest or {}).get("created") or ""
    parts.append(f"<header><h1>Precision schedule for <code>{_e(model)}</code></h1>")
    parts.append(
        f'<p class="sub">{_e(report.results.root)}{" · " + _e(created) if created else ""} · qsched {_e(__version__)}</p></header>'
    )

    if report.gate is not None:
        cls = "pass" if report.gate.passed else "fail"
        parts.append(
            f'<div class="banner {cls}" id="gate">{_e(report.gate.reason)} (baseline: {_e(report.gate.baseline_dir)})</div>'
        )

    # Headline
    parts.append('<section class="card" id="headline"><h2>Chosen schedule</h2>')
    if s is None:
        parts.append(
            '<p class="placeholder">No schedule.json: run <code>qsched search</code> to choose a schedule.</p>'
        )
    else:
        ts = s.get("timesteps") or []
        parts.append(
            f'<p class="note">One cell per denoising step, in the order they run ({len(s["levels"])} steps); '
            f"reference level <code>{_e(report.reference)}</code>.</p>"
        )
        cells = []
        for i, lvl in enumerate(s["levels"]):
            colour = report.colours.get(lvl, "#999999")
            t = f" · t={ts[i]}" if i < len(ts) else ""
            cells.append(
                f'<div class="cell" style="background:{colour};color:{_text_colour(colour)}" title="step {i}{_e(t)}: {_e(lvl)}">'
                f'<span class="lvl">{_e(lvl)}</span><span class="t">step {i}{_e(t)}</span></div>'
            )
        parts.append(f'<div class="strip">{"".join(cells)}</div>')
        legend = "".join(
            f'<span><span class="sw" style="background:{report.colours[lvl]}"></span>{_e(lvl)}'
            f"{' (reference)' if lvl == report.reference else ''}</span>"
            for lvl in report.levels
        )
        parts.append(f'<div class="legend">{legend}</div>')
        overrides = overrides_png(report)
        if overrides is not None:
            count = sum(len(step) for step in s["overrides"])
            parts.append(f'<p class="note">Per-layer overrides ({count}): each layer group\'s level in each step; the '
                         "faint cells follow their step's level.</p>")
            parts.append(f"<figure>{_img_tag(overrides, 'per-layer overrides by step', scale=_FIGURE_SCALE)}</figure>")
        stats = "".join(
            f'<div class="stat"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="d">{_e(d)}</div></div>'
            for k, v, d in _headline_facts(report)
        )
        parts.append(f'<div class="stats">{stats}</div>')
    parts.append("</section>")

    # After the headline, which stays first; a report with gaps still leads with what it has.
    if report.missing:
        items = "".join(f"<li>{_e(line)}</li>" for line in report.missing)
        parts.append(f'<div class="missing" id="missing"><strong>Missing files</strong><ul>{items}</ul></div>')
    if report.warnings:
        items = "".join(f"<li>{_e(line)}</li>" for line in report.warnings)
        parts.append(f'<div class="warn" id="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    parts.append(
        '<nav><a href="#sensitivity">Sensitivity</a><a href="#pareto">Pareto</a><a href="#samples">Samples</a>'
        '<a href="#points">Pareto points</a><a href="#provenance">Provenance</a></nav>'
    )

    # Sensitivity
    parts.append('<section class="card" id="sensitivity"><h2>Step sensitivity</h2>')
    heat = heatmap_png(report)
    if heat is None:
        parts.append('<p class="placeholder">No probe.csv with step rows: run <code>qsched probe</code>.</p>')
    else:
        m = report.heatmap_metric
        parts.append(
            f'<p class="note">{_e(m)} of the output when only that step runs at that precision and every other step at '
            f"the reference; the last row runs all steps at it. Darker is worse.</p>"
        )
        parts.append(f"<figure>{_img_tag(heat, f'sensitivity heatmap ({m})', scale=_FIGURE_SCALE)}</figure>")
    parts.append("</section>")

    # Pareto
    parts.append('<section class="card" id="pareto"><h2>Cost vs quality</h2>')
    pareto = pareto_png(report)
    if pareto is None:
        parts.append('<p class="placeholder">No trials.csv: run <code>qsched search</code>.</p>')
    else:
        parts.append(
            '<p class="note">Every completed trial in grey, the Pareto front in blue (with CIs), uniform schedules as '
            "diamonds, the chosen schedule as a star, the budget dashed.</p>"
        )
        parts.append(f"<figure>{_img_tag(pareto, 'Pareto plot', scale=_FIGURE_SCALE)}</figure>")
        fail = _failures(report)
        if fail:
            parts.append(f'<p class="note">{_e(fail)}</p>')
    parts.append("</section>")

    # Samples
    parts.append('<section class="card" id="samples"><h2>Samples</h2>')
    labels, rows = _image_grid(report)
    if not rows:
        parts.append('<p class="placeholder">No images/index.csv: the search writes sample images there.</p>')
    else:
        parts.append(
            '<p class="note">The same prompt and seed in every column; metric values are against the reference.</p>'
        )
        head = "".join(f"<th>{_e(_column_title(report, lbl, rows))}</th>" for lbl in labels)
        body = []
        for r in rows:
            tds = [
                f'<td class="rowh"><strong>sample {_e(r["sample"])}</strong><br>'
                f'{_e(r["prompt"]) if not pd.isna(r["prompt"]) else ""}<br><span class="m">seed {_e(r["seed"])}</span></td>'
            ]
            for lbl in labels:
                cell = r["cells"].get(lbl)
                if cell is None:
                    tds.append("<td>—</td>")
                    continue
                path = rd.images_dir / str(cell["file"])
                if path.is_file():
                    img = _img_tag(path.read_bytes(), f"{lbl} sample {r['sample']}", "px" if _small_image(path) else "")
                else:
                    img = f'<span class="placeholder">missing {_e(cell["file"])}</span>'
                metrics = " · ".join(f"{_e(k)} {_e(v)}" for k, v in _image_metrics(cell))
                tds.append(f'<td>{img}<div class="m">{metrics}</div></td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        parts.append(
            f'<table class="grid"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        )
    parts.append("</section>")

    # Pareto points
    parts.append('<section class="card" id="points"><h2>Pareto points</h2>')
    front = _front_rows(report)
    if front is None:
        parts.append('<p class="placeholder">No pareto.csv or trials.csv.</p>')
    else:
        headers, rows = front
        note = "Non-dominated schedules over (cost, quality), cheapest first; the chosen one is highlighted."
        if report.front_recomputed:
            note += " Recomputed from trials.csv (pareto.csv is missing)."
        parts.append(f'<p class="note">{_e(note)}</p>')
        text_cols = {"schedule", "source", "within budget"}
        head = "".join(f"<th{'' if h in text_cols else ' class=num'}>{_e(h)}</th>" for h in headers)
        body = []
        for is_chosen, cells in rows:
            tds = []
            for h in headers:
                if h == "schedule":
                    badge = ' <span class="badge">chosen</span>' if is_chosen else ""
                    tds.append(f'<td class="sched">{_mini_schedule(report, cells[h])}{badge}</td>')
                else:
                    tds.append(f"<td{'' if h in text_cols else ' class=num'}>{_e(cells[h])}</td>")
            body.append(f"<tr{' class=chosen' if is_chosen else ''}>" + "".join(tds) + "</tr>")
        parts.append(f'<table class="points"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    parts.append("</section>")

    # Provenance
    parts.append('<section class="card" id="provenance"><h2>Provenance</h2><dl>')
    for k, v in _provenance(report):
        parts.append(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>")
    parts.append("</dl></section>")

    title = f"qsched report · {model}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{REPORT_CSS.read_text()}</style></head>\n<body><main>\n"
        + "\n".join(parts)
        + "\n</main></body></html>\n"
    )
