"""`resnet reproduce EXPERIMENT`: re-run one of the paper's experiments and write its report."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

from ..errors import UserError
from ..experiments import EXPERIMENTS, Settings, reproduce
from ..models import list_models, model_spec
from ._common import add_format, print_json

HELP = "re-run one of the paper's experiments"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=EXPERIMENTS, metavar="EXPERIMENT",
                        help=f"one of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--data", help="data source (default: CIFAR-10; with --quick, the embedded digits set)")
    parser.add_argument("--out", help="report directory, trainings under OUT/runs (default: "
                        "runs/reproduce[-quick][-DATA][-itersN]/EXPERIMENT, trainings shared in "
                        "runs/reproduce[-quick][-DATA][-itersN]/trainings)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced settings (stated in the report) that finish in minutes on a laptop CPU")
    parser.add_argument("--seeds", type=int, default=1, help="trainings per network (mean and spread)")
    parser.add_argument("--depths", help="comma-separated depths instead of the experiment's, e.g. 20,56")
    parser.add_argument("--iters", type=int, dest="max_iters", help="with --quick: iterations per training")
    parser.add_argument("--val-size", type=int, help="with --quick and --data: images held out of train for "
                        "validation (default 1000)")
    add_format(parser, ("text", "json"))


def _depths(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        depths = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UserError(f"--depths must be comma-separated whole numbers such as 20,56, not '{text}'.") from None
    known = {model_spec(n).depth for n in list_models("cifar")}
    bad = [d for d in depths if d not in known]
    if bad:
        raise UserError(f"depth {bad[0]} has no CIFAR network; choose from {', '.join(map(str, sorted(known)))}.")
    return depths


def default_base(quick: bool, data: str | None, max_iters: int | None, val_size: int | None = None) -> str:
    """The folder the default layout uses for these settings. Trainings made with other data or another
    iteration count are other networks: each such setting gets its own folder, so runs never meet one of
    another setting's under the same name (which train() would refuse) and reports never overwrite each other."""
    base = "runs/reproduce" + ("-quick" if quick else "")
    default = None if quick else "cifar10"
    if data and data != default:
        if os.sep in data or os.path.exists(data):  # a folder: its name, and which folder it is
            path = os.path.abspath(os.path.expanduser(data))
            name = os.path.basename(path.rstrip(os.sep)) or "data"
            tag = f"{name}-{hashlib.sha256(path.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        else:
            tag = data
        base += "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("._") or "data")
    if max_iters:
        base += f"-iters{max_iters}"
    if val_size:
        base += f"-val{val_size}"
    return base


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {args.seeds}.")
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--iters must be at least 1 iteration, not {args.max_iters}.")
    if args.max_iters is not None and not args.quick:
        raise UserError("--iters shortens the --quick settings only; the full experiment uses the paper's recipes.")
    if args.val_size is not None and not (args.quick and args.data and args.data != "digits"):
        raise UserError("--val-size sets the --quick settings on --data only; the digits set has its own val "
                        "split and the full experiment uses the paper's recipes.")
    if args.val_size is not None and args.val_size < 1:
        raise UserError(f"--val-size must be a count of at least 1 image, not {args.val_size}.")
    # --quick --data digits is plain --quick (the quickstart recipe on the digits' own splits), not the CIFAR
    # recipe's augmentation and 1,000-image carve on 1,437 digits.
    data = None if args.quick and args.data == "digits" else args.data
    settings = Settings(quick=args.quick, data=data, seeds=args.seeds, depths=_depths(args.depths),
                        max_iters=args.max_iters, val_size=args.val_size)
    if args.out:
        out, runs_dir = args.out, None  # trainings under OUT/runs
    else:  # experiments share their trainings (degradation and responses need the same networks)
        base = default_base(args.quick, data, args.max_iters, args.val_size)
        out, runs_dir = f"{base}/{args.experiment}", f"{base}/trainings"
    results = reproduce(args.experiment, out, settings, runs_dir=runs_dir)
    if results.get("status") == "interrupted":
        print("stopped: a training was interrupted and has a checkpoint; run the same command again to resume "
              "the experiment.", file=sys.stderr)
        return 0
    if args.format == "json":
        print_json(results)
    else:
        print(f"report: {results['report']}")
    return 0
