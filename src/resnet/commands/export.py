"""`resnet export MODEL --format onnx|torchscript|safetensors --out FILE [--fold-bn]`."""

from __future__ import annotations

import argparse

HELP = "export a trained model to ONNX, TorchScript or safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"),
                        help="file format to write")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=None, dest="fold_bn",
                        help="fold BatchNorm into the convolutions (default: on for onnx and torchscript, "
                             "off for safetensors)")
    parser.add_argument("--no-check", action="store_true", dest="no_check",
                        help="skip comparing the exported model's outputs with PyTorch's")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..export import check_export, export_model
    from ..loading import load_from_args

    model, meta = load_from_args(args)
    out = export_model(model, meta, args.format, args.out, fold=args.fold_bn)
    line = f"wrote {out} ({args.format}, {out.stat().st_size / 1e6:.1f} MB)"
    if not args.no_check:
        diff = check_export(model, meta, out, args.format)
        if diff is not None:
            if diff > 1e-4:
                raise UserError(f"the exported '{out}' differs from PyTorch by {diff:.2e} (over 1e-4); "
                                f"report this with the model.")
            line += f"; max |logit difference| vs PyTorch {diff:.1e}"
    print(line)
    return 0
