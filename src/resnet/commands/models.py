"""`resnet models`: every registered model with its complexity and the paper's figure beside ours."""

from __future__ import annotations

import argparse

from ..complexity import model_cost
from ..models import list_models, model_spec, resolve_options
from ._common import add_format, print_json, print_table

HELP = "table of every model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("imagenet", "cifar"), help="only one family")
    parser.add_argument("--variant", choices=("v1", "v1.5"), default=None,
                        help="bottleneck stride placement for the ImageNet family (default v1, the paper's)")
    add_format(parser)


def model_rows(family: str | None = None, variant: str | None = None) -> list[dict]:
    rows = []
    for name in list_models(family):
        spec = model_spec(name)
        opts = {"variant": variant} if variant else {}
        resolved = resolve_options(name, **opts)
        cost = model_cost(name, **opts)
        rows.append({
            "name": name, "family": spec.family, "depth": spec.depth, "block": spec.block,
            "residual": spec.residual, "shortcut": resolved["shortcut"], "variant": resolved["variant"],
            "num_classes": resolved["num_classes"], "input_size": list(cost["input_size"]),
            "params": cost["params"], "macs": cost["macs"],
            "paper_params": spec.paper.get("params"), "paper_macs": spec.paper.get("macs"),
            "paper_top1_err": spec.paper.get("top1_err"),
        })
    return rows


def _paper_column(row: dict) -> str:
    if row["paper_macs"]:
        # Table 1 counts the paper's own (v1) bottleneck; say so beside a v1.5 network, which costs more.
        which = "Table 1, v1" if row["block"] == "bottleneck" and row["variant"] == "v1.5" else "Table 1"
        return f"{row['paper_macs'] / 1e9:.1f}G MACs ({which})"
    if row["paper_params"]:
        return f"{row['paper_params'] / 1e6:.2f}M params, {row['paper_top1_err']}% err (Table 6)"
    return ""


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.family, args.variant)
    if args.format == "json":
        print_json(rows)
        return 0
    print_table(
        ["model", "family", "depth", "type", "shortcut", "params", "MACs", "paper"],
        [[r["name"], r["family"], r["depth"], "residual" if r["residual"] else "plain", r["shortcut"] or "-",
          f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}G", _paper_column(r)] for r in rows],
        align="llrllrrl",
    )
    return 0
