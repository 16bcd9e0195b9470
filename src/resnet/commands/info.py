"""`resnet info NAME [options]`: per-stage output shapes, parameters and multiply-adds of one model."""

from __future__ import annotations

import argparse

from ..complexity import as_dicts, model_cost, stage_costs
from ..models import resolve_options
from ._common import add_format, add_model_options, model_options, print_json, print_table

HELP = "per-stage shapes, params and MACs of one model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name, e.g. resnet50 (see 'resnet models')")
    add_model_options(parser)
    add_format(parser)


def run(args: argparse.Namespace) -> int:
    opts = model_options(args)
    resolved = resolve_options(args.name, **opts)
    cost = model_cost(args.name, **opts)
    stages = stage_costs(args.name, **opts)
    if args.format == "json":
        print_json({"name": args.name, "options": resolved, "params": cost["params"], "macs": cost["macs"],
                    "input_size": list(cost["input_size"]), "stages": as_dicts(stages)})
        return 0
    shown = ", ".join(f"{k}={v}" for k, v in resolved.items())
    print(f"{args.name} ({shown}), input {'x'.join(map(str, cost['input_size']))}")
    print_table(["stage", "output", "params", "MACs"],
                [[s.name, "x".join(map(str, s.out_shape)), f"{s.params:,}", f"{s.macs / 1e6:,.1f}M"]
                 for s in stages] + [["total", "", f"{cost['params']:,}", f"{cost['macs'] / 1e9:.3f}G"]],
                align="llrr")
    return 0
