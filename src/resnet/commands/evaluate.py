"""`resnet eval MODEL [--data ...] [--split test] [--views ...] [--format json]`: top-1/top-5 error."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "top-1/top-5 error of a trained model on a data split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.views import VIEWS
    from ..loading import add_model_arguments
    from ._common import add_inference_precision, add_weight_bits

    add_model_arguments(parser)
    parser.add_argument("--data", default=None,
                        help="cifar10, cifar100, digits, or an ImageFolder directory ROOT/<split>/<class>/<image> "
                             "(default: the data the model's training run used, as its model.json records)")
    parser.add_argument("--split", default=None,
                        help="split to score (default: test, else val, else the val split the model's training "
                             "carved out of train)")
    parser.add_argument("--views", default=None, choices=VIEWS,
                        help="evaluation view (default: the model's own; 10crop = Tables 2-3, "
                             "multiscale = Table 4, full = CIFAR's single original view, flip = the "
                             "image and its mirror)")
    parser.add_argument("--val-size", type=float, default=None, dest="val_size",
                        help="carve the val split out of train like this (a count, or a fraction < 1); "
                             "default: the split the model's training run carved, when it carved one")
    parser.add_argument("--data-seed", type=int, default=None, dest="data_seed",
                        help="seed of that carve (default: the training run's)")
    parser.add_argument("--batch-size", type=int, default=128, dest="batch_size", help="images per batch")
    parser.add_argument("--data-dir", dest="data_dir", help="where cifar10/cifar100 live")
    parser.add_argument("--cache-dir", dest="cache_dir", help="decode cache folder")
    parser.add_argument("--per-class", action="store_true", dest="per_class", help="also the error per class")
    parser.add_argument("--confusion", metavar="PNG", help="write the confusion matrix as a PNG")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "compile", "onnxruntime"),
                        help="inference backend (see docs/inference.md)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    add_inference_precision(parser, ", calibrated on images of the data's train split; the error printed is "
                                    "that model's")
    parser.add_argument("--calibration-size", type=int, default=None, dest="calibration_size",
                        help="images to calibrate int8 on (default 512)")
    add_weight_bits(parser)
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError, user_path
    from ..evaluate import evaluate, save_confusion_png
    from ..inference import resolve_device
    from ..loading import load_from_args
    from ._common import auto_precision_note, check_int8_flags, print_json, print_table
    from ._common import cpu_for_int8 as _cpu_for_int8

    check_int8_flags(args)
    if args.confusion:  # checked before the evaluation, which may take long, rather than after it
        args.confusion = str(user_path(args.confusion))
        suffix = Path(args.confusion).suffix
        if suffix.lower() not in ("", ".png"):
            raise UserError(f"--confusion writes a PNG image; name it *.png, not '{args.confusion}'.")
        args.confusion = args.confusion if suffix else f"{args.confusion}.png"
        folder = Path(args.confusion).parent
        try:  # the folder it goes into, made (or refused) now: not after an evaluation that may take an hour
            folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError as err:
            why = "a file is in the way" if isinstance(err, FileExistsError | NotADirectoryError) else err.strerror
            raise UserError(f"cannot write the confusion matrix into '{folder}' ({why}); choose another "
                            f"--confusion path.") from None
        if not writable:
            raise UserError(f"cannot write the confusion matrix into '{folder}' (permission denied); choose "
                            f"another --confusion path.")
    model, meta = load_from_args(args)
    data = args.data or meta.get("data")
    if not data:
        raise UserError(f"'{meta.get('source', args.model)}' does not record the data it was trained on; pass "
                        "--data (cifar10, cifar100, digits or an ImageFolder directory).")
    # The run's own source is read from where the run read it, unless --data-dir says otherwise.
    data_dir = args.data_dir or (meta.get("data_dir") if data == meta.get("data") else None)
    res = evaluate(model, meta, data, split=args.split, view=args.views, batch_size=args.batch_size,
                   data_dir=data_dir, cache_dir=args.cache_dir,
                   per_class=args.per_class or bool(args.confusion), backend=args.backend,
                   device=resolve_device(_cpu_for_int8(args)), val_size=args.val_size, data_seed=args.data_seed,
                   precision=args.precision, calibration_size=args.calibration_size, weight_bits=args.weight_bits)
    confusion = res.pop("_confusion")
    if not args.per_class:
        res.pop("per_class", None)
    import torch.distributed as dist

    from ..train.distributed import teardown

    rank = dist.get_rank() if dist.is_initialized() else 0
    # Every collective is done. Leave the group before exiting: a gloo group still alive at interpreter exit
    # can abort the process ("terminate called without an active exception") after a good result.
    teardown()
    if rank != 0:
        return 0
    auto_precision_note("eval", args, res["precision"])
    if args.confusion:
        save_confusion_png(confusion, meta["classes"], args.confusion)
        res["confusion_png"] = args.confusion
    if args.format == "json":
        print_json(res)
        return 0
    carved = res.get("val_carved")
    split = (f"{res['split']}: {carved['val_size']:g} of train, seed {carved['seed']}" if carved
             else res["split"])
    precision = "" if res["precision"] == "fp32" else f", {res['precision']}"
    print(f"{res['model']} on {res['data']} [{split}], view {res['view']}{precision}: n={res['n']}  "
          f"top-1 error {100 * res['top1_err']:.2f}%  top-{res['top5_k']} error {100 * res['top5_err']:.2f}%")
    if res.get("skipped"):
        print(f"({res['skipped']} unreadable images skipped)")
    if res.get("calibration"):
        cal = res["calibration"]
        print(f"(int8 calibrated on {cal['n']} images of the {cal['split']} split, {cal['weight_bits']}-bit weights)")
    if args.per_class:
        rows = [[r["class"], r["n"], "-" if r["top1_err"] is None else f"{100 * r['top1_err']:.2f}"]
                for r in res["per_class"]]
        print_table(["class", "n", "top-1 err %"], rows, align="lrr")
    if args.confusion:
        print(f"confusion matrix: {args.confusion}")
    return 0
