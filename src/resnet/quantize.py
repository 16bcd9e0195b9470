"""int8 inference: static quantization of the exported ONNX model, calibrated on real images.

The convolutions of the residual stages run on ONNX Runtime's int8 kernels (u8 activations, s8 weights
per output channel, QDQ format); the stem convolution (3 input channels, a sliver of the work) and the
classifier stay fp32, the usual practice for the layers that see raw pixels and produce the logits.
Activation ranges come from a calibration pass over `CALIBRATION_SIZE` images of the model's own training
data (min/max). Weights are per output channel, with 7 or 8 bits (`weight_bits`). On CPUs without VNNI,
as this project's 2-core AVX2 machine, the int8 kernels add pairs of u8 x s8 products in 16 bits and full-range
weights overflow there, so they get 7 bits (ONNX Runtime's `reduce_range`). VNNI sums in 32 bits, so where
the CPU has it, 8-bit weights are the default. Measured on the AVX2 machine, the paper-recipe ResNet-20, 5,000
validation images, single view (docs/inference.md): fp32 11.54%; int8 with 7-bit weights 11.46% (top-1 agrees
with fp32 on 98.96% of images); with the stem and classifier quantized too 11.66%. With everything quantized
and 1024 calibration images, 8-bit weights gave 12.76% against 11.58% for 7-bit ones. On a VNNI CPU (Zen 4),
8-bit weights agreed with fp32 more often than 7-bit ones on all four models and views checked
(docs/inference.md), with equal errors within noise.

An exported int8 file may run on another CPU than the one that wrote it, so `resnet export` writes 7-bit
weights unless told otherwise; `eval` and `predict` quantize for the CPU they run on.

int8 is opt-in (`--precision int8`): it is a different model from the one trained, close but not equal,
so every command that uses it says so, and `resnet eval --precision int8` measures how close.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable

import numpy as np
import torch

from .errors import UserError

WEIGHT_BITS = (7, 8)
CALIBRATION_SIZE = 512  # images
CALIBRATION_BATCH = 64


def weight_bits_for(bits: int | None = None, *, portable: bool = False) -> int:
    """The int8 weights' bits: `bits` when given (7 or 8), else 7 for a file that may run on any CPU
    (`portable`), else 8 where this CPU has VNNI and 7 where it does not."""
    from .machine import has_vnni

    if bits is None:
        return 7 if portable or not has_vnni() else 8
    if bits not in WEIGHT_BITS:
        raise UserError(f"int8 weights have 7 or 8 bits, not {bits}.")
    return bits


def calibration_split(splits, scored: str) -> str:
    """The split int8 calibrates on when `scored` is evaluated: train, so never the scored images, unless the
    scored split is train or the data has no train split."""
    return "train" if "train" in splits and scored != "train" else scored


def calibration_view(meta: dict) -> str:
    """One view per image: CIFAR models' own full image, ImageNet models' centre crop (the scale every
    other view is cut at)."""
    from .data.views import canonical_view

    view = canonical_view(meta.get("eval_view") or "center")
    return "full" if view in ("full", "flip") else "center"


def calibration_batches(split, meta: dict, size: int = CALIBRATION_SIZE, seed: int = 0,
                        batch_size: int = CALIBRATION_BATCH, offset: int = 0) -> list[torch.Tensor]:
    """Normalised float batches of `size` images drawn at random (seeded) from `split` (a data split,
    memory or stream), each as the model sees it at evaluation (one view). Unreadable files are skipped.
    `offset` skips that many images of the same seeded draw (offset=size gives other images than size=size)."""
    from .data.decode import BadImage, check_aspect, decode_image
    from .predict import prepare

    n = len(split)
    if n == 0:
        raise UserError("the calibration split has no images; give data with images for int8 calibration.")
    if size < 1:
        raise UserError(f"the calibration size must be at least 1 image, not {size}.")
    idx = np.sort(np.random.default_rng(seed).permutation(n)[offset:offset + size])
    if len(idx) == 0:
        raise UserError(f"the split has {n} images, too few to draw {size} after the first {offset}.")
    one_view = {**meta, "eval_view": calibration_view(meta)}
    images: list[torch.Tensor] = []
    if split.kind == "memory":
        for chunk in np.array_split(idx, max(1, len(idx) // 256)):
            for img in split.gather(torch.as_tensor(chunk)):
                images.append(prepare(img, one_view))
    else:
        in_chans = int(meta["input_size"][0])
        for i in idx:
            try:
                img = torch.from_numpy(check_aspect(decode_image(split.paths[i], in_chans)))
            except BadImage:
                continue
            images.append(prepare(img, one_view))
    if not images:
        raise UserError("none of the calibration images could be read; give other data for int8 calibration.")
    x = torch.stack(images).float().contiguous()
    return list(x.split(batch_size))


def quantize_onnx(model_bytes: bytes, batches: Iterable[torch.Tensor], weight_bits: int | None = None) -> bytes:
    """The int8 (QDQ) version of an fp32 ONNX model, activation ranges calibrated on `batches`, its weights of
    `weight_bits` bits (default: as `weight_bits_for` chooses for this CPU); the metadata records the bits."""
    bits = weight_bits_for(weight_bits)
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        raise UserError("int8 inference needs onnx and onnxruntime; install them with: "
                        "pip install 'resnet[onnx]'.") from None

    feeds = [{"input": b.detach().cpu().float().contiguous().numpy()} for b in batches]
    if not feeds:
        raise UserError("int8 calibration needs at least one batch of images.")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    proto = onnx.load_from_string(model_bytes)
    props = [(p.key, p.value) for p in proto.metadata_props]
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    keep_fp32 = convs[:1] + [n.name for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to run its pre-processing script first
    try:
        with tempfile.TemporaryDirectory(prefix="resnet-int8-") as tmp:
            src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            with open(src, "wb") as f:
                f.write(model_bytes)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=bits == 7, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=keep_fp32)
            out = onnx.load(dst)
    finally:
        logging.getLogger().setLevel(quiet)
    del out.metadata_props[:]
    for key, value in props:  # the model's classes and normalisation travel with the int8 file too
        if key == "resnet":
            meta = json.loads(value)
            meta["precision"] = "int8"
            meta["int8_weight_bits"] = bits
            value = json.dumps(meta)
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    out.producer_name = "resnet"
    return out.SerializeToString()


def calibration_from_data(meta: dict, data: str | None = None, *, data_dir: str | None = None,
                          cache_dir: str | None = None, size: int | None = None,
                          held_out: int = 0) -> tuple[list[torch.Tensor], dict, list[torch.Tensor]]:
    """Calibration batches from `data` (default: the data the model was trained on, as model.json records
    it): `size` images of its train split (else of its first split). Returns (batches, {"data", "split", "n"},
    up to `held_out` other images of the same split, for checking the int8 model; [] when held_out=0 or none
    are left)."""
    from .data import load_dataset

    data = data or meta.get("data")
    if not data:
        raise UserError(f"'{meta.get('source', 'the model')}' does not record the data it was trained on; pass "
                        "--calibration-data (cifar10, cifar100, digits or an ImageFolder directory) for int8.")
    if data_dir is None and data == meta.get("data"):
        data_dir = meta.get("data_dir")  # the run's own source, read from where the run read it
    ds = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir, in_chans=int(meta["input_size"][0]))
    split = "train" if "train" in ds.splits else next(iter(ds.splits))
    size = size or CALIBRATION_SIZE
    batches = calibration_batches(ds.splits[split], meta, size=size)
    left = min(held_out, len(ds.splits[split]) - size)
    other = calibration_batches(ds.splits[split], meta, size=left, offset=size) if left > 0 else []
    return batches, {"data": str(data), "split": split, "n": sum(len(b) for b in batches)}, other
