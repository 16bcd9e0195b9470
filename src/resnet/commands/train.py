"""`resnet train --recipe NAME|FILE.yaml [--data ...] [--out DIR] [key=value ...]`: run or resume a recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = "train a model from a recipe (running it again resumes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help="a shipped recipe name (e.g. cifar10-resnet20, quickstart) or a YAML file")
    parser.add_argument("--data", help="data source: cifar10, cifar100, digits, or an ImageFolder directory "
                                       "(overrides the recipe's)")
    parser.add_argument("--out", help="run directory (default runs/<recipe>); the same --out resumes")
    parser.add_argument("--data-dir", dest="data_dir", help="where cifar10/cifar100 are kept or downloaded to "
                        "(the data_dir setting; default $RESNET_DATA_DIR or ~/.cache/resnet/datasets)")
    parser.add_argument("--cache-dir", dest="cache_dir", help="where decoded folders are cached (the cache_dir "
                        "setting; default $RESNET_CACHE_DIR or ~/.cache/resnet/cache)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="how to print the summary")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="strict settings overrides, e.g. lr=0.05 max_iters=1000 precision=bf16")
    from ..train.config import KEYS

    parser.epilog = (f"Settings (key=value, explained in docs/training.md): {', '.join(KEYS)}. "
                     "Multi-process: torchrun --nproc_per_node=K -m resnet train ...")


def resolve(args: argparse.Namespace):
    """The config and run directory the arguments ask for."""
    from ..train import load_recipe
    from ..train.config import replace, validate

    cfg = load_recipe(args.recipe, args.overrides)
    # The flags are taken as written (a path is not read as YAML, where ' #' would start a comment).
    flags = {key: getattr(args, key) for key in ("data", "data_dir", "cache_dir") if getattr(args, key, None)}
    if flags:
        cfg = replace(cfg, **flags)
        validate(cfg)
    _check_data(cfg.data)
    return cfg, Path(args.out or Path("runs") / cfg.recipe)


def _check_data(data: str) -> None:
    from ..errors import UserError

    if data == "imagenet" and not Path(data).is_dir():
        raise UserError("the ImageNet recipes need --data ROOT, an ImageFolder tree with ROOT/train/<class>/ "
                        "and ROOT/val/<class>/ images.")


def print_summary(summary: dict, out: Path, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({**summary, "out": str(out)}))
        return
    if summary.get("status") != "finished":
        print(f"run in {out} stopped at iteration {summary.get('iterations')}; "
              f"run the same command to resume.")
        return
    lines = [f"run {out} ({summary['recipe']}, {summary['arch']}): {summary['iterations']} iterations "
             f"in {summary['wall_s']:.1f} s, {summary['images_per_s']:.0f} training images/s"]
    for split in ("val", "test"):
        err = summary.get(f"{split}_top1_err")
        if err is not None:
            lines.append(f"  {split}: top-1 error {100 * err:.2f}% (accuracy {100 * (1 - err):.2f}%), "
                         f"top-5 error {100 * summary[f'{split}_top5_err']:.2f}%")
            trained = summary.get(f"{split}_top1_err_trained")
            if trained is not None:
                lines[-1] += (f" with the averaged (EMA) weights it saved; the trained weights: "
                              f"{100 * trained:.2f}%")
    if summary.get("skipped"):
        lines.append(f"  {summary['skipped']} unreadable images were skipped (listed in the data report)")
    print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    from ..train import train

    cfg, out = resolve(args)
    summary = train(cfg, out)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print_summary(summary, out, args.format)
    sys.stdout.flush()
    return 0
