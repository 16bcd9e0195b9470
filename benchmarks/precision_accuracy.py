"""A lower precision against fp32 on one trained model: both errors on the same images, and how often they agree.

For each batch of the scored split (loaded and carved as `resnet eval` does), the fp32 path
(`InferenceModel`, the default of `resnet eval`) and the `--precision` path compute logits: int8 (default;
calibrated as `resnet eval --precision int8` calibrates it: 512 images of the data's train split, never the
scored images) or bf16 (on CPUs with AVX512_BF16 or AMX). Prints one JSON line: n, the top-1 error of each,
the share of images where their top-1 classes agree, the images only one of them gets right (the paired
counts of a McNemar test), and the per-image cosine of the two logit vectors (minimum and median). The errors
equal what `resnet eval --precision fp32|int8|bf16` prints for the same split and view.

Run: python benchmarks/precision_accuracy.py [RUN_DIR] [--data DATA] [--split val] [--views full]
     [--precision int8|bf16] [--weight-bits 7|8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from resnet.data import load_dataset, make_loader
from resnet.data.views import canonical_view, view_logits
from resnet.evaluate import class_mapping, view_config
from resnet.inference import InferenceModel
from resnet.loading import load_model
from resnet.quantize import CALIBRATION_SIZE, calibration_batches, calibration_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="runs/quickstart",
                        help="run directory or model file (default: runs/quickstart, from `make demo`)")
    parser.add_argument("--data", help="data to score (default: what the model was trained on, per model.json)")
    parser.add_argument("--split", default=None, help="split to score (default: test, else val)")
    parser.add_argument("--views", default=None, help="evaluation view (default: the model's)")
    parser.add_argument("--precision", choices=("int8", "bf16"), default="int8",
                        help="the precision compared with fp32 (default int8)")
    parser.add_argument("--weight-bits", type=int, choices=(7, 8), default=None, dest="weight_bits",
                        help="bits of the int8 weights (default: 8 where this CPU has VNNI, else 7, as resnet eval)")
    args = parser.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"no model at {args.model}; run `make demo` first, or pass a run directory.")
    model, meta = load_model(args.model)
    data = args.data or meta.get("data")
    if not data:
        raise SystemExit(f"{args.model} does not record the data it was trained on; pass --data.")
    carve = meta.get("val_split") or {}
    ds = load_dataset(data, data_dir=None if args.data else meta.get("data_dir"),
                      in_chans=int(meta["options"]["in_chans"]), val_size=carve.get("val_size"),
                      seed=int(carve.get("seed", 0)))
    split = args.split or ("test" if "test" in ds.splits else "val")
    view = canonical_view(args.views or meta.get("eval_view") or "center")
    low, calibration = args.precision, {}
    fp32 = InferenceModel(model, meta, precision="fp32")
    if low == "int8":
        source = calibration_split(ds.splits, split)
        batches = calibration_batches(ds.splits[source], meta, size=CALIBRATION_SIZE)
        other = InferenceModel(model, meta, precision="int8", calibration=batches, weight_bits=args.weight_bits)
        calibration = {"calibration": {"split": source, "n": sum(len(t) for t in batches),
                                       "weight_bits": other.weight_bits}}
    else:
        other = InferenceModel(model, meta, precision=low)
    mapping = class_mapping(list(meta["classes"]), list(ds.classes))
    loader = make_loader(ds.splits[split], 250, train=False, augment="none", mean=meta["mean"],
                         std=meta["std"], channels_last=True, eval_view=view, cfg=view_config(meta))
    logits32, logits_low, labels = [], [], []
    for x, y in loader.iter_epoch(0):
        logits32.append(view_logits(fp32, x).float())
        logits_low.append(view_logits(other, x).float())
        labels.append(mapping[y])
    a, b, y = torch.cat(logits32), torch.cat(logits_low), torch.cat(labels)
    right32, right_low = a.argmax(1) == y, b.argmax(1) == y
    cos = F.cosine_similarity(a, b, dim=1)
    print(json.dumps({
        "bench": "precision_accuracy", "precision": low, "model": str(args.model), "arch": meta["arch"],
        "data": str(data), "split": split, "view": view, "n": len(y),
        "fp32_top1_err": round(1 - right32.float().mean().item(), 5),
        f"{low}_top1_err": round(1 - right_low.float().mean().item(), 5),
        "top1_agreement": round((a.argmax(1) == b.argmax(1)).float().mean().item(), 5),
        # the paired counts behind the difference (McNemar): images only one of the two gets right
        "only_fp32_right": int((right32 & ~right_low).sum()), f"only_{low}_right": int((right_low & ~right32).sum()),
        "logit_cosine_min": round(cos.min().item(), 5), "logit_cosine_median": round(cos.median().item(), 5),
        **calibration, **machine()}))


if __name__ == "__main__":
    main()
