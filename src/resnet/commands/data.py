"""`resnet data DATA`: describe a data source the way the trainer sees it (splits, classes, sizes, skips)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

HELP = "describe a data source the way the trainer sees it"


def _val_size(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count of images or a fraction below 1") from None
    return int(value) if value >= 1 and value.is_integer() else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", metavar="DATA", help="cifar10, cifar100, digits, or a folder ROOT/<split>/<class>/<image>"
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format (json for scripts)"
    )
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        help="where CIFAR is kept (default $RESNET_DATA_DIR or ~/.cache/resnet/datasets)",
    )
    parser.add_argument(
        "--cache-dir",
        dest="cache_dir",
        help="where decoded folders are cached (default $RESNET_CACHE_DIR or ~/.cache/resnet/cache)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail at the first bad image instead of skipping it"
    )
    parser.add_argument("--in-chans", dest="in_chans", type=int, default=3, choices=(1, 3))
    parser.add_argument(
        "--val-size",
        dest="val_size",
        type=_val_size,
        default=None,
        help="carve a validation split of this many images (or this fraction) from train",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation carve")


def run(args: argparse.Namespace) -> int:
    from ..data import SkippedImageWarning, load_dataset
    from ..data.describe import describe, describe_text

    with warnings.catch_warnings():
        # Skipped files are reported in the output itself, not as one warning line each; every other warning
        # (a val_size that is ignored, a split folder that is not read) is what training would show too.
        warnings.simplefilter("ignore", SkippedImageWarning)
        ds = load_dataset(
            args.data,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            in_chans=args.in_chans,
            val_size=args.val_size,
            seed=args.seed,
            strict=args.strict,
        )
    info = describe(ds)
    if args.format == "json":
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(describe_text(info))
    return 0
