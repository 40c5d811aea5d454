"""`qsched report`: one results folder rendered to HTML, Markdown or JSON, and the regression gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qsched_search.errors import QschedError
from qsched_search.report.gate import GateResult, GateSpec, check_gate, parse_fail_if_worse
from qsched_search.report.loading import Results, load_results
from qsched_search.report.model import Report, UniformPoint, build_report
from qsched_search.results import io
from qsched_search.results.layout import ResultsDir

__all__ = ["FORMATS", "GateResult", "GateSpec", "Report", "ReportOutcome", "Results", "UniformPoint", "build_report",
           "check_gate", "load_results", "make_report", "parse_fail_if_worse", "render_html", "render_json",
           "render_markdown", "write_report"]

FORMATS = ("html", "md", "json")


def render_html(report: Report) -> str:
    from qsched_search.report.html import render_html as render

    return render(report)


def render_markdown(report: Report, assets_dir: str):
    from qsched_search.report.markdown import render_markdown as render

    return render(report, assets_dir)


def render_json(report: Report) -> dict:
    from qsched_search.report.summary import render_json as render

    return render(report)


def write_report(report: Report, out: str | Path, fmt: str = "html") -> Path:
    """Renders `report` in `fmt` and writes it atomically to `out`; Markdown's PNGs go to `<out stem>_files/`.

    Returns:
        `Path`: `out`.
    """
    if fmt not in FORMATS:
        raise QschedError(f"format {fmt!r} is not one of {', '.join(FORMATS)}; pick one, e.g. --format html")
    out = Path(out)
    if fmt == "html":
        io.write_text(out, render_html(report))
    elif fmt == "json":
        io.write_json(out, render_json(report))
    else:
        text, assets = render_markdown(report, f"{out.stem}_files")
        # Images first, so the markdown never links a PNG that is not there yet.
        for rel, data in assets.items():
            io.write_bytes(out.parent / rel, data)
        io.write_text(out, text)
    return out


@dataclass(frozen=True)
class ReportOutcome:
    """What `make_report` wrote and found."""

    path: Path
    report: Report

    @property
    def missing(self) -> list[str]:
        return self.report.missing

    @property
    def gate(self) -> GateResult | None:
        return self.report.gate


def make_report(
    results_dir: str | Path,
    fmt: str = "html",
    *,
    out: str | Path | None = None,
    baseline_dir: str | Path | None = None,
    fail_if_worse: str | None = None,
) -> ReportOutcome:
    """Everything `qsched report` does: load, compare, gate, render, write.

    Args:
        results_dir (`str` or `Path`): the results folder.
        fmt (`str`, *optional*): `html`, `md` or `json`; defaults to `html`.
        out (`str` or `Path`, *optional*): defaults to `ResultsDir(results_dir).report(fmt)`.
        baseline_dir (`str` or `Path`, *optional*): a results folder to compare with; defaults to `None`.
        fail_if_worse (`str`, *optional*): `METRIC:TOLERANCE`, needs `baseline_dir`; defaults to `None`.

    Returns:
        `ReportOutcome`: the written path and the report; `outcome.gate.passed` is the gate's verdict.
    """
    if fmt not in FORMATS:
        raise QschedError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}; pick one, e.g. --format html")
    gate = parse_fail_if_worse(fail_if_worse) if fail_if_worse is not None else None
    if gate is not None and baseline_dir is None:
        raise QschedError(
            f"--fail-if-worse {fail_if_worse} needs --baseline OTHER_RESULTS_DIR to compare with; pass the baseline "
            f"results folder too"
        )
    results = load_results(results_dir)
    baseline = None
    if baseline_dir is not None:
        baseline = load_results(baseline_dir, argument="--baseline")
    report = build_report(results, baseline=baseline, gate=gate)
    path = write_report(report, out if out is not None else ResultsDir(results.root).report(fmt), fmt)
    return ReportOutcome(path=path, report=report)
