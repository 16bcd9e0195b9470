"""`resnet export MODEL --format onnx|torchscript|safetensors --out FILE [--fold-bn]`."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

HELP = "export a trained model to ONNX, TorchScript or safetensors"
# Largest accepted |logit difference| from PyTorch, relative to the largest |logit| (at least 1): fp32
# reassociation in another runtime grows with the logits' size (a randomly initialised ResNet-50 reaches
# logits of several hundred and differences of ~6e-4 there; a trained model's stay far below 1e-4).
TOLERANCE = 1e-4
# The names each format's files go by; a name of another format's is refused (a .safetensors that holds ONNX
# would be read as a broken model later). Other names are the user's choice.
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".pts", ".torchscript"),
            "safetensors": (".safetensors",)}
# What `resnet train` keeps in a run folder: an export never takes one of these names beside its model.
RUN_FILES = ("model.safetensors", "model.json", "checkpoint.pt", "config.yaml", "summary.json", "metrics.jsonl",
             "curves.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..loading import add_model_arguments
    from ._common import add_weight_bits

    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"),
                        help="file format to write")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=None, dest="fold_bn",
                        help="fold BatchNorm into the convolutions (default: on for onnx and torchscript, "
                             "off for safetensors)")
    parser.add_argument("--no-check", action="store_true", dest="no_check",
                        help="skip comparing the exported model's outputs with PyTorch's")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                        help="int8 (onnx only): an int8 model for ONNX Runtime, calibrated on images of "
                             "--calibration-data (docs/inference.md)")
    parser.add_argument("--calibration-data", default=None, dest="calibration_data",
                        help="data whose train split int8 is calibrated on (default: the model's training data)")
    parser.add_argument("--calibration-size", type=int, default=None, dest="calibration_size",
                        help="images to calibrate int8 on (default 512)")
    add_weight_bits(parser, portable=True)
    parser.add_argument("--data-dir", dest="data_dir", help="where cifar10/cifar100 live (for calibration)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError, user_path
    from ..export import export_error, export_model
    from ..loading import load_from_args
    from ._common import check_int8_flags

    check_int8_flags(args, runs_here=False)  # the file may run on another CPU: 8 bits may be meant
    model, meta = load_from_args(args)
    out = user_path(args.out)  # "--out=~/m.onnx" reaches us unexpanded: never a folder named "~" here
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; name the file to write, e.g. "
                        f"{out / ('model' + SUFFIXES[args.format][0])}.")
    _refuse_clobbering(out, args.format, Path(meta["source"]))
    calibration = held_out = bits = None
    if args.precision == "int8":
        if args.format != "onnx":
            raise UserError(f"--precision int8 writes ONNX (run by ONNX Runtime's int8 kernels); use --format onnx, "
                            f"not {args.format}.")
        from ..quantize import calibration_from_data, weight_bits_for

        bits = weight_bits_for(args.weight_bits, portable=True)

        # Checked below on up to 256 other images of the split it was calibrated on.
        calibration, info, held_out = calibration_from_data(meta, args.calibration_data, data_dir=args.data_dir,
                                                            size=args.calibration_size, held_out=256)
    # Written and checked under a temporary name, renamed only when it passed: a failed export never
    # replaces the file a user already had at --out.
    tmp = out.with_name(f".{out.name}.unchecked{out.suffix}")
    try:
        export_model(model, meta, args.format, tmp, fold=args.fold_bn, calibration=calibration,
                     weight_bits=bits)
        line = f"wrote {out} ({args.format}, {tmp.stat().st_size / 1e6:.1f} MB)"
        if calibration is not None:  # int8 is close to fp32, not equal: checked as agreement of the top class
            line = f"wrote {out} (onnx int8, {bits}-bit weights, {tmp.stat().st_size / 1e6:.1f} MB, calibrated on " \
                   f"{info['n']} images of {info['data']} ({info['split']}))"
            if held_out and not args.no_check:
                import torch

                from ..export import run_exported

                x = torch.cat(held_out)
                with torch.inference_mode():
                    ref = model.eval()(x).argmax(1)
                agree = float((run_exported(tmp, "onnx", x).argmax(1) == ref).float().mean())
                line += f"; top-1 agrees with PyTorch fp32 on {100 * agree:.1f}% of {len(x)} other images"
            elif not args.no_check:
                line += "; not checked: the calibration used every image of that split"
        elif not args.no_check:
            diff, scale = export_error(model, meta, tmp, args.format)
            if diff > TOLERANCE * max(1.0, scale):
                raise UserError(f"the {args.format} export differs from PyTorch by {diff:.2e} (logits up to "
                                f"{scale:.3g}), over the {TOLERANCE:g} tolerance; nothing was written to '{out}'; "
                                f"report this with the model.")
            line += f"; max |logit difference| vs PyTorch {diff:.1e}"
        os.replace(tmp, out)
    except OSError as err:
        why = ("a file is in the way of its folder" if isinstance(err, FileExistsError | NotADirectoryError)
               else err.strerror or err)
        raise UserError(f"cannot write '{out}' ({why}); choose another --out.") from None
    finally:
        with contextlib.suppress(OSError):  # a folder that could not be written holds no temporary either
            tmp.unlink(missing_ok=True)
    print(line)
    return 0


def _refuse_clobbering(out: Path, fmt: str, source: Path) -> None:
    """--out must not be the model being read, nor one of the files of the run it belongs to, nor carry the
    suffix of another format (or of metadata)."""
    from ..errors import UserError
    from ..train.checkpoint import NAME as CHECKPOINT

    suffix = out.suffix.lower()
    if suffix in (".json", ".yaml", ".jsonl") or any(suffix in names for other, names in SUFFIXES.items()
                                                      if other != fmt and suffix not in SUFFIXES[fmt]):
        raise UserError(f"--out '{out}' is named like another kind of file than {fmt}; name it "
                        f"*{SUFFIXES[fmt][0]}.")
    folder = out.resolve().parent
    hint = source.parent / f"{source.resolve().parent.name or 'model'}-export{SUFFIXES[fmt][0]}"
    ours = out.name in RUN_FILES and folder == source.resolve().parent
    if ours or (out.exists() and os.path.samefile(out, source)):
        raise UserError(f"--out '{out}' would replace the files of the model being exported; write to another "
                        f"name, e.g. {hint}.")
    # Any training run's folder: an export named checkpoint.pt there ended that run's resumability.
    if out.name in RUN_FILES and any((folder / name).exists() for name in ("config.yaml", CHECKPOINT)):
        raise UserError(f"--out '{out}' would replace a file of the training run in {folder}; write to another "
                        f"name, e.g. {hint}.")
