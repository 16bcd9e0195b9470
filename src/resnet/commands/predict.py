"""`resnet predict MODEL IMAGE_OR_DIR... [--topk 5] [--format table|json|csv]`: class predictions."""

from __future__ import annotations

import argparse
import csv
import sys

HELP = "class predictions for images or folders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..loading import add_model_arguments
    from ._common import add_inference_precision, add_weight_bits

    add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of them")
    parser.add_argument("--topk", type=int, default=5, help="how many classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, dest="batch_size", help="images per batch")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "compile", "onnxruntime"),
                        help="inference backend (see docs/inference.md)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    add_inference_precision(parser)
    parser.add_argument("--calibration-data", default=None, dest="calibration_data",
                        help="data whose train split int8 is calibrated on (default: the model's training data, "
                             "as its model.json records)")
    parser.add_argument("--calibration-size", type=int, default=None, dest="calibration_size",
                        help="images to calibrate int8 on (default 512)")
    add_weight_bits(parser)
    parser.add_argument("--data-dir", dest="data_dir", help="where cifar10/cifar100 live (for calibration)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..inference import InferenceModel, resolve_device
    from ..loading import load_from_args
    from ..predict import find_images, predict_files
    from ._common import auto_precision_note, check_int8_flags, print_json
    from ._common import cpu_for_int8 as _cpu_for_int8

    check_int8_flags(args)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, not {args.topk}.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 image, not {args.batch_size}.")
    model, meta = load_from_args(args)
    problems: list[dict] = []
    paths = find_images(args.inputs, problems)
    calibration = None
    if args.precision == "int8":
        from ..quantize import calibration_from_data

        calibration, info, _ = calibration_from_data(meta, args.calibration_data, data_dir=args.data_dir,
                                                  size=args.calibration_size)
    predictor = InferenceModel(model, meta, backend=args.backend, device=resolve_device(_cpu_for_int8(args)),
                               precision=args.precision, calibration=calibration, weight_bits=args.weight_bits)
    if calibration is not None:
        print(f"resnet predict: int8, calibrated on {info['n']} images of {info['data']} ({info['split']}), "
              f"{predictor.weight_bits}-bit weights.", file=sys.stderr)
    elif args.precision == "bf16":
        print("resnet predict: bf16 (weights and activations rounded to bfloat16).", file=sys.stderr)
    else:
        auto_precision_note("predict", args, predictor.precision)
    results = predict_files(predictor, meta, paths, topk=args.topk, batch_size=args.batch_size) + problems
    for r in results:  # a file name that is not UTF-8 is shown with \x escapes, not a crash on printing it
        r.update({k: _printable(r[k]) for k in ("path", "error") if k in r})
    failed = [r for r in results if "error" in r]
    if args.format == "json":
        print_json(results)
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["path", "rank", "label", "prob", "error"])
        for r in results:
            for i, p in enumerate(r.get("predictions", []), 1):
                w.writerow([r["path"], i, p["label"], f"{p['prob']:.6f}", ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
    else:
        for r in results:
            if "error" in r:
                continue
            top = "  ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in r["predictions"])
            print(f"{r['path']}: {top}")
    for r in failed:
        print(f"resnet predict: '{r['path']}' {r['error']}; skipped.", file=sys.stderr)
    if failed:
        print(f"resnet predict: {len(failed)} of {len(results)} images failed.", file=sys.stderr)
        return 1
    return 0


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (held as surrogates) written as \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
