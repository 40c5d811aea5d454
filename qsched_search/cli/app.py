"""The `qsched` typer app: joins one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from qsched_search._version import __version__
from qsched_search.cli.calibrate import calibrate
from qsched_search.cli.export import export
from qsched_search.cli.generate import generate
from qsched_search.cli.precisions import precisions
from qsched_search.cli.probe import probe
from qsched_search.cli.profile import profile
from qsched_search.cli.report import report
from qsched_search.cli.search import search
from qsched_search.cli.weights import app as weights_app

app = typer.Typer(
    name="qsched",
    help="Find which precision each denoising step of a few-step diffusion model should run at.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"qsched-search {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Probe per-step sensitivity, search a per-step precision schedule under a budget, report, and apply it."""


app.command()(probe)
app.command()(precisions)
app.command()(search)
app.command()(report)
app.command()(generate)
app.command()(profile)
app.command()(calibrate)
app.command()(export)
app.add_typer(weights_app, name="weights", help="Fetch and check the metric weight files (LPIPS, Inception) offline.")


def main() -> None:
    app()
