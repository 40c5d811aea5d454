"""`qsched precisions`: print the precision menu."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qsched_search.cli._common import MenuOpt, user_errors
from qsched_search.quant.levels import load_menu


@user_errors
def precisions(
    menu: MenuOpt = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the menu as JSON.")] = False,
):
    """Print the precision menu: each level's format, bits, granularity and bit-operation cost."""
    loaded = load_menu(menu or None)
    if as_json:
        import json

        typer.echo(json.dumps(loaded.to_dict(), indent=2))
        return
    table = Table(title=f"precision menu ({loaded.source}); target {loaded.target}: quantizes {', '.join(loaded.layer_types)}")
    for col in ("level", "format", "W bits", "A bits", "relative bit-ops", "what it simulates"):
        table.add_column(col)
    for level in loaded.levels.values():
        table.add_row(level.name, level.format, str(level.weight_bits), str(level.act_bits),
                      f"{level.relative_bops:.4g}", level.describe())
    Console().print(table)
