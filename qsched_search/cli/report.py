"""`qsched report`: parses the command line, calls `qsched_search.report.make_report`, prints, sets the exit code."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from qsched_search.errors import QschedError


class ReportFormat(str, enum.Enum):
    html = "html"
    md = "md"
    json = "json"


def report(
    results_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RESULTS_DIR",
            help="The results folder `qsched probe` / `qsched search` wrote.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        ReportFormat,
        typer.Option("--format", "-f", help="html: one self-contained page; md: Markdown plus PNGs; json: a summary."),
    ] = ReportFormat.html,
    baseline: Annotated[
        Optional[Path],
        typer.Option(
            "--baseline", metavar="OTHER_RESULTS_DIR", help="A results folder to compare with.", show_default=False
        ),
    ] = None,
    fail_if_worse: Annotated[
        Optional[str],
        typer.Option(
            "--fail-if-worse",
            metavar="METRIC:TOLERANCE",
            help="Exit 1 if the schedule is worse than --baseline's on METRIC by more than TOLERANCE "
            "(e.g. lpips:0.01), or costs more.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Where to write; defaults to RESULTS_DIR/report.FORMAT.", show_default=False),
    ] = None,
) -> None:
    """Render the report of a results folder, and gate on a baseline in CI (exit 0 pass, 1 worse, 2 bad input)."""
    # Imported here so `qsched --help` does not pay for pandas and matplotlib.
    from qsched_search.report import make_report

    try:
        outcome = make_report(results_dir, fmt.value, out=out, baseline_dir=baseline, fail_if_worse=fail_if_worse)
    except QschedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    for line in outcome.missing:
        typer.echo(line)
    for line in outcome.report.warnings:
        # stdout, so that stderr carries only the one-line error or gate verdict that CI logs are read for.
        typer.echo(f"warning: {line}")
    if outcome.report.schedule is not None:
        from qsched_search.results.compare import budget_sentence

        typer.echo(budget_sentence(outcome.report.schedule))
    typer.echo(f"wrote {outcome.path}")
    if outcome.gate is not None:
        if not outcome.gate.passed:
            typer.echo(outcome.gate.reason, err=True)
            raise typer.Exit(code=1)
        typer.echo(outcome.gate.reason)
