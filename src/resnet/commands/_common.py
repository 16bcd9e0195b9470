"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys


def add_format(parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json")) -> None:
    parser.add_argument("--format", choices=choices, default=choices[0],
                        help="output format (json for scripts)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The create_model options as flags; unset flags keep the model's defaults."""
    parser.add_argument("--shortcut", choices=("A", "B", "C"), help="shortcut option of Table 3")
    parser.add_argument("--variant", choices=("v1", "v1.5"),
                        help="v1: stride on the bottleneck's first 1x1 (paper); v1.5: on the 3x3 (torchvision)")
    parser.add_argument("--num-classes", type=int, dest="num_classes")
    parser.add_argument("--in-chans", type=int, dest="in_chans")


def model_options(args: argparse.Namespace) -> dict:
    keys = ("shortcut", "variant", "num_classes", "in_chans")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list], align: str | None = None) -> None:
    """A plain aligned text table; `align` has one 'l' or 'r' per column (default: text left, numbers right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], int | float) else "l" for i in range(len(headers)))

    def fmt(values):
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w)
                         for v, w, a in zip(values, widths, align, strict=True)).rstrip()

    print(fmt(headers))
    print(fmt(["-" * w for w in widths]))
    for r in cells:
        print(fmt(r))


def cpu_for_int8(args: argparse.Namespace) -> str:
    """int8 runs on the CPU: --device auto means the CPU then, even where a GPU is present."""
    return "cpu" if getattr(args, "precision", "fp32") == "int8" and args.device == "auto" else args.device


def add_inference_precision(parser: argparse.ArgumentParser, int8_detail: str = "") -> None:
    """--precision for the commands that run a model (eval, predict): auto, fp32, bf16 or int8."""
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                        help="auto (default): bf16 on CPUs with AVX512_BF16 or AMX (the fastest there, at the same "
                             "accuracy), else fp32; bf16: the model in bfloat16, on such CPUs and on GPUs; int8: "
                             f"quantize for ONNX Runtime on the CPU{int8_detail} (docs/inference.md)")


def auto_precision_note(command: str, args: argparse.Namespace, resolved: str) -> None:
    """One stderr line when --precision auto chose bf16, so that a user comparing with fp32 knows."""
    if getattr(args, "precision", None) == "auto" and resolved == "bf16":
        print(f"resnet {command}: bf16 (this CPU computes in it; --precision fp32 runs in fp32).", file=sys.stderr)


def add_weight_bits(parser: argparse.ArgumentParser, *, portable: bool = False) -> None:
    default = ("default 7, which every CPU runs; 8 is closer to fp32 but only for CPUs with VNNI (AVX512_VNNI, "
               "AVX-VNNI), where the file will run" if portable else
               "default 8 where this CPU has VNNI, else 7 (without VNNI, 8-bit weights can overflow)")
    parser.add_argument("--weight-bits", type=int, default=None, choices=(7, 8), dest="weight_bits",
                        help=f"bits of the int8 weights ({default}; docs/inference.md)")


def check_int8_flags(args: argparse.Namespace, *, runs_here: bool = True) -> None:
    """The calibration flags mean something only with --precision int8; given without it, say so. When the
    int8 model `runs_here` (eval, predict), 8-bit weights on a CPU without VNNI get a one-line warning."""
    from ..errors import UserError

    given = [flag for flag, dest in (("--calibration-size", "calibration_size"),
                                     ("--calibration-data", "calibration_data"),
                                     ("--weight-bits", "weight_bits")) if getattr(args, dest, None)]
    if given and getattr(args, "precision", "fp32") != "int8":
        raise UserError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for int8 models only; "
                        f"add --precision int8, or leave "
                        f"{'them' if len(given) > 1 else 'it'} out.")
    if getattr(args, "calibration_size", None) is not None and args.calibration_size < 1:
        raise UserError(f"--calibration-size must be at least 1 image, not {args.calibration_size}.")
    if runs_here and getattr(args, "weight_bits", None) == 8 and getattr(args, "precision", None) == "int8":
        from ..machine import has_vnni

        if not has_vnni():
            print("warning: this CPU has no VNNI, so its int8 kernels add products in 16 bits and 8-bit weights "
                  "can overflow there; --weight-bits 7 (the default here) avoids it.", file=sys.stderr)
