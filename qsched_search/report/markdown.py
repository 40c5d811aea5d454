"""The report as Markdown, with its figures and images as PNG files beside it."""

from __future__ import annotations

from typing import Any

import pandas as pd

from qsched_search._version import __version__
from qsched_search.report.figures import heatmap_png, overrides_png, pareto_png, schedule_png
from qsched_search.report.model import Report
from qsched_search.report.text import (_column_title, _failures, _front_rows, _headline_facts, _image_grid,
                                       _image_metrics, _provenance)
from qsched_search.results.layout import ResultsDir

__all__ = ["render_markdown"]


def _md(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, assets_dir: str) -> tuple[str, dict[str, bytes]]:
    """Markdown text plus the PNGs it links, keyed by their path relative to the markdown file.

    Args:
        report (`Report`): from `build_report`.
        assets_dir (`str`): the folder, relative to the markdown file, that the PNGs go to (e.g. `report_files`).
    """
    s = report.schedule
    rd = ResultsDir(report.results.root)
    assets: dict[str, bytes] = {}
    out: list[str] = []

    def asset(name: str, data: bytes) -> str:
        rel = f"{assets_dir}/{name}"
        assets[rel] = data
        return rel

    model = (s or {}).get("model", {}).get("id") or (report.results.manifest or {}).get("model") or "unknown model"
    out.append(f"# Precision schedule for `{model}`\n")
    out.append(f"_{report.results.root} · qsched {__version__}_\n")
    if report.gate is not None:
        out.append(
            f"> **{'PASS' if report.gate.passed else 'FAIL'}** {report.gate.reason} (baseline: {report.gate.baseline_dir})\n"
        )
    if report.missing:
        out.append("**Missing files**\n")
        out.extend(f"- {line}" for line in report.missing)
        out.append("")
    if report.warnings:
        out.append("**Warnings**\n")
        out.extend(f"- {line}" for line in report.warnings)
        out.append("")

    out.append("## Chosen schedule\n")
    if s is None:
        out.append("_No schedule.json: run `qsched search` to choose a schedule._\n")
    else:
        strip = schedule_png(report)
        if strip is not None:
            out.append(f"![chosen schedule]({asset('schedule.png', strip)})\n")
        overrides = overrides_png(report)
        if overrides is not None:
            out.append(f"![per-layer overrides by step]({asset('overrides.png', overrides)})\n")
        ts = s.get("timesteps") or []
        out.append("| step | " + " | ".join(str(i) for i in range(len(s["levels"]))) + " |")
        out.append("|---|" + "---|" * len(s["levels"]))
        if ts:
            out.append("| timestep | " + " | ".join(str(t) for t in ts) + " |")
        out.append("| level | " + " | ".join(f"**{_md(lvl)}**" for lvl in s["levels"]) + " |\n")
        out.append("| | |\n|---|---|")
        out.extend(f"| **{_md(k)}** | {_md(v)} — {_md(d)} |" for k, v, d in _headline_facts(report))
        out.append("")

    out.append("## Step sensitivity\n")
    heat = heatmap_png(report)
    if heat is None:
        out.append("_No probe.csv with step rows: run `qsched probe`._\n")
    else:
        out.append(
            f"{report.heatmap_metric} of the output when only that step runs at that precision and every other step "
            f"at the reference; the last row runs all steps at it. Darker is worse.\n"
        )
        out.append(f"![sensitivity heatmap]({asset('sensitivity.png', heat)})\n")

    out.append("## Cost vs quality\n")
    pareto = pareto_png(report)
    if pareto is None:
        out.append("_No trials.csv: run `qsched search`._\n")
    else:
        out.append(f"![Pareto plot]({asset('pareto.png', pareto)})\n")
        fail = _failures(report)
        if fail:
            out.append(f"{fail}\n")

    out.append("## Samples\n")
    labels, rows = _image_grid(report)
    if not rows:
        out.append("_No images/index.csv: the search writes sample images there._\n")
    else:
        out.append("| sample | " + " | ".join(_md(_column_title(report, lbl, rows)) for lbl in labels) + " |")
        out.append("|---|" + "---|" * len(labels))
        for r in rows:
            tds = [
                f"**{_md(r['sample'])}** {_md(r['prompt']) if not pd.isna(r['prompt']) else ''} (seed {_md(r['seed'])})"
            ]
            for lbl in labels:
                cell = r["cells"].get(lbl)
                if cell is None:
                    tds.append("—")
                    continue
                path = rd.images_dir / str(cell["file"])
                metrics = ", ".join(f"{k} {v}" for k, v in _image_metrics(cell))
                if path.is_file():
                    rel = asset(f"images/{r['sample']}_{lbl}{path.suffix or '.png'}", path.read_bytes())
                    tds.append(f"![{lbl}]({rel})<br>{_md(metrics)}")
                else:
                    tds.append(f"missing {_md(cell['file'])}<br>{_md(metrics)}")
            out.append("| " + " | ".join(tds) + " |")
        out.append("")

    out.append("## Pareto points\n")
    front = _front_rows(report)
    if front is None:
        out.append("_No pareto.csv or trials.csv._\n")
    else:
        headers, rows = front
        out.append("Non-dominated schedules over (cost, quality), cheapest first; the chosen one in bold.\n")
        if report.front_recomputed:
            out.append("_Recomputed from trials.csv (pareto.csv is missing)._\n")
        out.append("| " + " | ".join(_md(h) for h in headers) + " |")
        out.append("|" + "".join("---|" if h in ("schedule", "source", "within budget") else "--:|" for h in headers))
        for is_chosen, cells in rows:
            texts = [f"`{cells[h]}`" if h == "schedule" else _md(cells[h]) for h in headers]
            if is_chosen:
                texts = [f"**{t}**" for t in texts]
            out.append("| " + " | ".join(texts) + " |")
        out.append("")

    out.append("## Provenance\n")
    out.extend(f"- **{_md(k)}**: {_md(v)}" for k, v in _provenance(report))
    out.append("")
    return "\n".join(out), assets
