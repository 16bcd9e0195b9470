"""`resnet demo` (what `make demo` runs): train the quickstart recipe and say where everything is."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "the main job: train the quickstart recipe on the embedded digits set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart); "
                                                                 "running again resumes or reuses it")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings overrides (see resnet train)")


def run(args: argparse.Namespace) -> int:
    from ..train import load_recipe, train
    from .train import print_summary

    out = Path(args.out)
    cfg = load_recipe("quickstart", args.overrides)
    existed = (out / "summary.json").exists()
    summary = train(cfg, out)
    print_summary(summary, out, args.format)
    if args.format == "text" and summary.get("status") == "finished":
        if existed:
            print(f"(this run had already finished; delete {out} to train it again)")
        print(f"outputs in {out}/: model.safetensors + model.json (the trained model), curves.png "
              f"(training and validation error against iterations), metrics.jsonl, summary.json, "
              f"config.yaml, checkpoint.pt, tb/ (tensorboard --logdir {out / 'tb'})")
        print(f"next: resnet eval {out}   |   resnet predict {out} IMAGE...")
    return 0
