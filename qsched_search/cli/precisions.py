"""`qsched precisions`: print the precision menu, or (`--groups`) a model's layer groups with their sizes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qsched_search.cli._common import (BatchOpt, DeviceOpt, DtypeOpt, FamilyOpt, GroupingOpt, MenuOpt, ModelOpt, PrecisionsOpt,
                                       ReferenceOpt, split_list, user_errors)
from qsched_search.quant.levels import load_menu


@user_errors
def precisions(
    menu: MenuOpt = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the menu (or the groups) as JSON.")] = False,
    groups: Annotated[bool, typer.Option("--groups", help="List the layer groups of --model (per-layer overrides) with "
                                         "their layers, parameters and multiply-accumulates.")] = False,
    model: ModelOpt = "embedded",
    family: FamilyOpt = "",
    grouping: GroupingOpt = "",
    precisions: PrecisionsOpt = "",
    reference: ReferenceOpt = "fp32",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 64,
):
    """Print the precision menu: each level's format, bits, granularity and bit-operation cost.

    With --groups, load --model and list its layer groups (the family's default grouping, or --grouping): each
    group's layers, parameters and multiply-accumulates per sample of one denoiser call (the layers --precisions
    quantize at a batch of --batch-size, as probe and search see them).
    """
    loaded = load_menu(menu or None)
    if groups:
        from qsched_search.quant.backends import default_precisions

        # The levels probe and search default to on this device; the sizes come from the simulation bank (same layers).
        levels = split_list(precisions) or default_precisions("auto", device, dtype, loaded)
        _print_groups(loaded, model, family or None, grouping or None, levels, reference, device, dtype, batch_size, as_json)
        return
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


def group_sizes(bank, layer_groups) -> list[dict]:
    """One row per group: its layers, parameters, MACs per sample and share of the denoiser's MACs, and the levels
    that quantize its layers."""
    costs = bank.layer_costs()
    total = sum(costs.macs.values())
    rows = []
    for name, layers in layer_groups.groups.items():
        macs = costs.macs_of(layers)
        rows.append({"group": name, "layers": len(layers), "params": costs.params_of(layers), "macs": macs,
                     "macs_share": macs / total if total else 0.0,
                     "levels": [lv for lv in bank.levels if set(layers) & set(bank.quantized_layers[lv])]})
    return rows


def _print_groups(menu, model, family, grouping, levels, reference, device, dtype, batch_size, as_json) -> None:
    from qsched_search.quant.groups import bank_groups
    from qsched_search.session import RunSettings, open_session

    settings = RunSettings(model=model, steps=1, precisions=levels, reference=reference, samples=batch_size, device=device,
                           dtype=dtype, batch_size=batch_size, family=family, backend="sim")
    session = open_session(settings, metrics=False, menu=menu)
    try:
        found = bank_groups(session.bank, session.model.family, grouping)
        rows = group_sizes(session.bank, found)
    finally:
        session.close()
    if as_json:
        import json

        typer.echo(json.dumps({"model": model, "family": session.model.family.family, "grouping": found.name,
                               "ungrouped": list(found.ungrouped), "groups": [{**r, "modules": list(found.groups[r["group"]])}
                                                                              for r in rows]}, indent=2))
        return
    table = Table(title=f"layer groups of {model} ({session.model.family.family}, grouping {found.name}); "
                        f"{len(found.switchable)} switchable layers, {len(found.ungrouped)} in no group")
    for col in ("group", "layers", "params", "MACs / sample", "share of MACs", "quantized by"):
        table.add_column(col, justify="left" if col in ("group", "quantized by") else "right")
    for r in rows:
        table.add_row(r["group"], str(r["layers"]), f"{r['params']:,}", f"{r['macs']:,}", f"{r['macs_share']:.2%}",
                      ", ".join(r["levels"]))
    Console().print(table)
