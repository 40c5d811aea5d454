"""Every figure the tool draws, once: the probe heatmap, the Pareto plot, the search history, the schedule strip.

Each function builds a matplotlib `Figure` through the object API (no pyplot, no global state, no display) and
either saves it (`path=...`, written atomically) or returns its PNG bytes, so the search's files and the report's
embedded images are the same pictures.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from qsched_search.results.io import atomic_path
from qsched_search.results.tables import BUDGET_EPS, completed, uniform_rows

__all__ = ["DPI", "metric_label", "plot_history", "plot_layer_heatmap", "plot_layer_schedule", "plot_pareto",
           "plot_probe_heatmap", "plot_schedule_strip"]

DPI = 150


def metric_label(metric: str | None, higher_is_better: bool | None) -> str:
    if not metric:
        return "quality"
    if higher_is_better is None:
        return metric
    return f"{metric} ({'higher' if higher_is_better else 'lower'} is better)"


def _finish(fig, path: str | Path | None) -> bytes | None:
    """Saves `fig` to `path` (format from the suffix) or returns its PNG bytes."""
    if path is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        return buf.getvalue()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return None


def _text_colour(rgba) -> str:
    lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "#111" if lum > 0.55 else "#fff"


def plot_probe_heatmap(probe: pd.DataFrame, metric: str, higher_is_better: bool, path: str | Path | None = None,
                       title: str = "", levels_order: list[str] | None = None) -> bytes | None:
    """Step x level heatmap of the change in `metric` from the noise floor (uniform schedules as the last row);
    darker is worse whichever way the metric points."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    data = probe[probe["metric"].astype(str) == metric].copy()
    data["delta"] = pd.to_numeric(data["delta"], errors="coerce")
    found = list(dict.fromkeys(data.loc[data["kind"] != "reference", "precision"].astype(str)))
    levels = [lv for lv in (levels_order or []) if lv in found] + [lv for lv in found if lv not in (levels_order or [])]
    steps_rows = data[data["kind"] == "step"]
    steps = sorted(int(s) for s in pd.to_numeric(steps_rows["step"], errors="coerce").dropna().unique())
    grid = np.full((len(steps) + 1, len(levels)), np.nan)
    labels = []
    for r, step in enumerate(steps):
        rows = steps_rows[pd.to_numeric(steps_rows["step"], errors="coerce") == step]
        t = rows["timestep"].iloc[0] if "timestep" in rows and len(rows) else None
        labels.append(f"step {step}" + (f" (t={int(t)})" if t is not None and not pd.isna(t) else ""))
        for c, level in enumerate(levels):
            cell = rows[rows["precision"].astype(str) == level]
            if len(cell) and not ("fail_reason" in cell and isinstance(cell["fail_reason"].iloc[0], str)
                                  and cell["fail_reason"].iloc[0]):
                grid[r, c] = cell["delta"].iloc[0]
    labels.append("all steps")
    uniform = data[data["kind"] == "uniform"]
    for c, level in enumerate(levels):
        cell = uniform[uniform["precision"].astype(str) == level]
        if len(cell):
            grid[-1, c] = cell["delta"].iloc[0]
    damage = -grid if higher_is_better else grid
    fig = Figure(figsize=(1.6 + 1.3 * max(1, len(levels)), 1.2 + 0.55 * len(labels)))
    ax = fig.add_subplot()
    finite = damage[np.isfinite(damage)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmax = vmin + 1e-9
    cmap = colormaps["magma_r"].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(damage), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_yticks(range(len(labels)), labels)
    ax.axhline(len(steps) - 0.5, color="white", linewidth=3)
    for (r, c), v in np.ndenumerate(grid):
        if np.isnan(v):
            ax.text(c, r, "failed" if r < len(steps) or len(uniform) else "—", ha="center", va="center", fontsize=9, color="#888")
            continue
        ax.text(c, r, f"{v:+.3g}", ha="center", va="center", fontsize=9, color=_text_colour(im.cmap(im.norm(damage[r, c]))))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(f"{'drop' if higher_is_better else 'rise'} in {metric} vs reference")
    ax.set_title(title or f"Per-step sensitivity ({metric})", fontsize=10)
    return _finish(fig, path)


def plot_pareto(trials: pd.DataFrame, front: pd.DataFrame, budget: float | None, cost_model: str | None, metric: str,
                higher_is_better: bool, steps: int | None = None, chosen: tuple[float, float] | None = None,
                path: str | Path | None = None, title: str = "", colours: Mapping[str, str] | None = None,
                reference: str | None = None) -> bytes | None:
    """Every completed schedule, the Pareto front with its CIs, uniform schedules, the budget line and the chosen
    schedule (`(cost, value)`). The cost axis is logarithmic when the costs span more than 20x: quantized levels
    cost a few percent of the reference, and a linear axis squeezes them against the left edge."""
    from matplotlib.figure import Figure

    done = completed(trials, metric)
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    feasible = done["cost"] <= (budget if budget is not None else math.inf) + BUDGET_EPS
    ax.scatter(done.loc[feasible, "cost"], done.loc[feasible, "value"], s=14, color="#7a9cc6", alpha=0.7,
               label="evaluated, within budget", zorder=2)
    if (~feasible).any():
        ax.scatter(done.loc[~feasible, "cost"], done.loc[~feasible, "value"], s=14, color="#bbbbbb", alpha=0.8,
                   label="evaluated, over budget", zorder=2)
    if front is not None and len(front):
        f = front.assign(cost=pd.to_numeric(front["cost"], errors="coerce"),
                         value=pd.to_numeric(front["value"], errors="coerce")).sort_values("cost")
        lo = pd.to_numeric(f.get("ci_low"), errors="coerce") if "ci_low" in f else f["value"]
        hi = pd.to_numeric(f.get("ci_high"), errors="coerce") if "ci_high" in f else f["value"]
        yerr = np.vstack([(f["value"] - lo).clip(lower=0).fillna(0), (hi - f["value"]).clip(lower=0).fillna(0)])
        ax.errorbar(f["cost"], f["value"], yerr=yerr, fmt="none", ecolor="#1f3b73", alpha=0.5, capsize=2, zorder=3)
        ax.step(f["cost"], f["value"], where="post", color="#1f3b73", linewidth=1.4, label="Pareto front (95% CI)", zorder=3)
        ax.scatter(f["cost"], f["value"], s=22, color="#1f3b73", zorder=4)
    uniform = uniform_rows(trials, steps, metric)
    if not uniform.empty:
        face = [(colours or {}).get(lv, "white") for lv in uniform["level"]]
        ax.scatter(uniform["cost"], uniform["value"], marker="D", s=46, facecolor=face, edgecolor="#d95f02",
                   linewidth=1.6, label="uniform schedules", zorder=5)
        for _, row in uniform.iterrows():
            ax.annotate(f"all {row['level']}", (row["cost"], row["value"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8, color="#d95f02")
    if budget is not None:
        ax.axvline(budget, color="#c0392b", linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
    if chosen is not None and all(math.isfinite(float(x)) for x in chosen):
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=220, color="#2ca02c", edgecolor="black", linewidth=0.6,
                   label="chosen schedule", zorder=6)
    costs = done["cost"][done["cost"] > 0]
    if len(costs) and costs.max() / costs.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"cost{f' ({cost_model})' if cost_model else ''}, fraction of all-{reference or 'reference'}")
    ax.set_ylabel(metric_label(metric, higher_is_better))
    ax.set_title(title or f"Schedules found: {metric} vs {cost_model or ''} cost", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, path)


def plot_history(trials: pd.DataFrame, budget: float, metric: str, higher_is_better: bool,
                 path: str | Path | None = None, title: str = "") -> bytes | None:
    """Each trial's quality in order, and the best quality within budget so far."""
    from matplotlib.figure import Figure

    frame = trials.assign(value=pd.to_numeric(trials["value"], errors="coerce"),
                          cost=pd.to_numeric(trials["cost"], errors="coerce"))
    fig = Figure(figsize=(7.5, 4))
    ax = fig.add_subplot()
    done = frame[frame["state"] == "COMPLETE"]
    feasible = done["cost"] <= budget + BUDGET_EPS
    cached = done["source"] == "cache"
    ax.scatter(done.loc[feasible & ~cached, "trial"], done.loc[feasible & ~cached, "value"], s=14, color="#1f77b4",
               label="within budget")
    ax.scatter(done.loc[~feasible & ~cached, "trial"], done.loc[~feasible & ~cached, "value"], s=14, color="#bbbbbb",
               label="over budget")
    if cached.any():
        ax.scatter(done.loc[cached, "trial"], done.loc[cached, "value"], s=10, marker="x", color="#999999",
                   label="cached (not re-run)")
    failed = frame[frame["state"] == "FAIL"]
    if not failed.empty and done["value"].notna().any():
        top = done["value"].max() if not higher_is_better else done["value"].min()
        ax.scatter(failed["trial"], [top] * len(failed), marker="v", color="#d62728", s=24, label="failed")
    best, curve = None, []
    for _, row in frame.iterrows():
        if row["state"] == "COMPLETE" and row["cost"] <= budget + BUDGET_EPS and not math.isnan(row["value"]):
            if best is None or (row["value"] > best if higher_is_better else row["value"] < best):
                best = row["value"]
        curve.append(np.nan if best is None else best)
    ax.step(frame["trial"], curve, where="post", color="#2ca02c", linewidth=1.8, label="best within budget")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric_label(metric, higher_is_better))
    ax.set_title(title or "Search history", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, path)


def plot_schedule_strip(levels: list[str], timesteps: list[int], colours: Mapping[str, str],
                        legend: list[str] | None = None, path: str | Path | None = None) -> bytes | None:
    """One coloured cell per denoising step with its level and timestep, and a legend of the levels."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    fig = Figure(figsize=(max(4.0, 1.1 * len(levels)), 1.5))
    ax = fig.add_axes([0, 0.3, 1, 0.7])
    for i, lvl in enumerate(levels):
        colour = colours.get(lvl, "#999999")
        ax.add_patch(Rectangle((i + 0.03, 0), 0.94, 1, color=colour))
        t = f"\nt={timesteps[i]}" if i < len(timesteps) else ""
        ax.text(i + 0.5, 0.5, f"{lvl}{t}", ha="center", va="center", color=_text_colour(to_rgba(colour)), fontsize=10)
    ax.set_xlim(0, len(levels))
    ax.set_ylim(0, 1)
    ax.axis("off")
    names = legend or list(dict.fromkeys(levels))
    fig.legend(handles=[Patch(color=colours.get(lv, "#999999"), label=lv) for lv in names], loc="lower center",
               ncol=len(names), frameon=False, fontsize=9)
    return _finish(fig, path)


def plot_override_map(levels: Sequence[str], overrides: Sequence[Sequence[Mapping]], groups: Sequence[str],
                      colours: Mapping[str, str], legend: list[str] | None = None,
                      path: str | Path | None = None) -> bytes | None:
    """Which layer groups run at which level in each step of a per-layer schedule: a group x step grid coloured by
    level, the step's own level in the top row and each override marked with its level's name.

    Args:
        levels (`Sequence[str]`): each step's level.
        overrides (`Sequence[Sequence[Mapping]]`): per step, schedule.json's overrides (`group` or `pattern`, `level`).
        groups (`Sequence[str]`): the grouping's group names, in module order (its `layer_groups` section).
        colours (`Mapping[str, str]`): level -> colour.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    if not any(overrides):
        return None
    rows = list(groups) + [f"~{o['pattern']}" for step in overrides for o in step if o.get("pattern")]
    rows = list(dict.fromkeys(rows))
    steps = len(levels)
    height = 0.9 + 0.22 * (len(rows) + 1)
    fig = Figure(figsize=(max(4.0, 1.0 * steps + 3.2), height))
    ax = fig.add_axes([0.42, 0.45 / height, 0.56, 1 - 0.75 / height])
    for i, own in enumerate(levels):
        at = {row: own for row in rows}
        for o in overrides[i] if i < len(overrides) else ():
            at[o.get("group") or f"~{o['pattern']}"] = o["level"]
        cells = [("step level", own, False)] + [(row, at[row], at[row] != own) for row in rows]
        for r, (_, lvl, overridden) in enumerate(cells):
            colour = colours.get(lvl, "#999999")
            ax.add_patch(Rectangle((i + 0.03, r + 0.05), 0.94, 0.9, color=colour, alpha=1.0 if overridden or r == 0 else 0.35))
            if overridden or r == 0:
                ax.text(i + 0.5, r + 0.5, lvl, ha="center", va="center", fontsize=7, color=_text_colour(to_rgba(colour)))
    ax.set_xlim(0, steps)
    ax.set_ylim(len(rows) + 1, 0)
    ax.set_xticks([i + 0.5 for i in range(steps)], [f"step {i}" for i in range(steps)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([r + 0.5 for r in range(len(rows) + 1)], ["step level"] + [_group_label(r) for r in rows], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    names = legend or list(dict.fromkeys([*levels, *(o["level"] for step in overrides for o in step)]))
    fig.legend(handles=[Patch(color=colours.get(lv, "#999999"), label=lv) for lv in names], loc="lower left",
               ncol=min(len(names), 4), frameon=False, fontsize=7)
    return _finish(fig, path)


def _group_label(name: str) -> str:
    # "down_blocks.1.attentions.0.transformer_blocks.0/ff" -> "down1.a0.t0/ff": rows stay readable.
    short = (name.replace("down_blocks.", "down").replace("up_blocks.", "up").replace("mid_block", "mid")
             .replace(".attentions.", ".a").replace(".transformer_blocks.", ".t")
             .replace("single_transformer_blocks.", "single").replace("transformer_blocks.", "double"))
    return short


def plot_layer_heatmap(table: pd.DataFrame, metric: str, higher_is_better: bool, level: str,
                       path: str | Path | None = None, title: str = "") -> bytes | None:
    """Layer group x step heatmap of the change in `metric` when only that group runs at `level` in that step
    (probe_layers.csv); darker is worse whichever way the metric points."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    data = table[(table["kind"] == "group") & (table["metric"].astype(str) == metric)
                 & (table["precision"].astype(str) == level)].copy()
    data["delta"] = pd.to_numeric(data["delta"], errors="coerce")
    groups = list(dict.fromkeys(data["group"].astype(str)))
    steps = sorted(int(s) for s in pd.to_numeric(data["step"], errors="coerce").dropna().unique())
    grid = np.full((len(groups), len(steps)), np.nan)
    index = {(str(r.group), int(r.step)): r for r in data.itertuples(index=False)}
    for i, g in enumerate(groups):
        for j, s in enumerate(steps):
            row = index.get((g, s))
            if row is not None and not (isinstance(row.fail_reason, str) and row.fail_reason):
                grid[i, j] = row.delta
    damage = -grid if higher_is_better else grid
    fig = Figure(figsize=(2.6 + 0.9 * max(1, len(steps)), 1.0 + 0.24 * max(1, len(groups))))
    ax = fig.add_subplot()
    finite = damage[np.isfinite(damage)]
    vmin, vmax = (float(min(0.0, finite.min())), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmax = vmin + 1e-9
    im = ax.imshow(np.ma.masked_invalid(damage), cmap=colormaps["magma_r"].with_extremes(bad="#eeeeee"),
                   vmin=vmin, vmax=vmax, aspect="auto")
    timesteps = {int(r.step): r.timestep for r in data.itertuples(index=False)}
    ax.set_xticks(range(len(steps)), [f"step {s}" + (f"\nt={int(timesteps[s])}" if not pd.isna(timesteps.get(s)) else "")
                                      for s in steps], fontsize=8)
    ax.set_yticks(range(len(groups)), [_group_label(g) for g in groups], fontsize=7)
    if len(groups) * len(steps) <= 160:
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c, r, f"{v:+.2g}", ha="center", va="center", fontsize=6,
                        color=_text_colour(im.cmap(im.norm(damage[r, c]))))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(f"{'drop' if higher_is_better else 'rise'} in {metric} vs reference", fontsize=8)
    ax.set_title(title or f"Layer-group sensitivity at {level} ({metric})", fontsize=9)
    return _finish(fig, path)


def plot_layer_schedule(grid: Mapping[str, list[str]], step_levels: list[str], timesteps: list[int],
                        colours: Mapping[str, str], path: str | Path | None = None, title: str = "") -> bytes | None:
    """The per-layer schedule as a picture: one row per layer group, one column per step, each cell coloured by
    the level that group runs at in that step; cells that differ from their step's level (the overrides) are
    outlined and labelled."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    groups = list(grid)
    n_steps = len(step_levels)
    fig = Figure(figsize=(2.8 + 1.0 * n_steps, 1.6 + 0.24 * max(1, len(groups))))
    ax = fig.add_subplot()
    for r, g in enumerate(groups):
        for c in range(n_steps):
            level = grid[g][c]
            overridden = level != step_levels[c]
            colour = colours.get(level, "#999999")
            ax.add_patch(Rectangle((c + 0.04, r + 0.06), 0.92, 0.88, facecolor=colour,
                                   edgecolor="#111111" if overridden else "none", linewidth=1.4 if overridden else 0))
            if overridden:
                ax.text(c + 0.5, r + 0.5, level, ha="center", va="center", fontsize=6.5,
                        color=_text_colour(to_rgba(colour)))
    ax.set_xlim(0, n_steps)
    ax.set_ylim(len(groups), 0)
    ax.set_xticks([c + 0.5 for c in range(n_steps)],
                  [f"step {c}: {step_levels[c]}" + (f"\nt={timesteps[c]}" if c < len(timesteps) else "") for c in range(n_steps)],
                  fontsize=8)
    ax.set_yticks([r + 0.5 for r in range(len(groups))], [_group_label(g) for g in groups], fontsize=7)
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    used = list(dict.fromkeys([*step_levels, *(lv for row in grid.values() for lv in row)]))
    fig.legend(handles=[Patch(color=colours.get(lv, "#999999"), label=lv) for lv in used], loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=len(used), frameon=False, fontsize=8)
    ax.set_title(title or "Which layer groups run at which level in each step (outlined: overrides)", fontsize=9)
    return _finish(fig, path)
