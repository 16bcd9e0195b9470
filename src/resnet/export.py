"""Export a trained model to ONNX, TorchScript or safetensors, with its metadata inside the file.

BatchNorm is folded into the convolutions by default for ONNX and TorchScript (inference graphs), and left
in place for safetensors unless asked (so the file still loads into the trainable architecture; a folded
safetensors file loads too, marked `bn_folded`). The metadata (architecture, classes, normalisation, input
size, evaluation view) travels as ONNX `metadata_props` (key "resnet", JSON), a TorchScript extra file
`resnet.json`, or the safetensors header entry "resnet". Batch, height and width are dynamic.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .artifacts import atomic_write_bytes
from .errors import UserError
from .inference import fold_bn, pad_shortcuts_as_conv

FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_OPSET = 17
META_FILE = "resnet.json"  # TorchScript _extra_files name
# "assumed": what a bare state dict did not record and the loader guessed; it stays a guess in the export.
_META_KEYS = ("arch", "options", "classes", "mean", "std", "input_size", "eval_view", "recipe", "metrics",
              "val_split", "assumed")


def export_meta(meta: dict, *, bn_folded: bool, fmt: str) -> dict:
    """The metadata written into an exported file (model.json's keys plus how it was exported)."""
    doc = {k: meta[k] for k in _META_KEYS if k in meta}
    doc.update({"format": "resnet-model/1", "bn_folded": bn_folded, "export_format": fmt,
                "input_name": "input", "output_name": "logits", "layout": "NCHW float32, normalised"})
    return doc


def _example(meta: dict, batch: int = 2) -> torch.Tensor:
    c, h, w = (int(v) for v in meta["input_size"])
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package; install it with: pip install 'resnet[onnx]'.") from None
    return onnx


def onnx_bytes(net: nn.Module, meta: dict) -> bytes:
    """The ONNX model of `net` (eval mode, NCHW float32 in, logits out) with metadata_props.

    Batch, height and width are dynamic: the network is fully convolutional up to the global pool, and the
    paper's multi-scale evaluation (Table 4) feeds it several sizes. Option-A shortcuts are written as
    exact 1x1 convolutions (`pad_shortcuts_as_conv`), which ONNX Runtime runs faster.
    """
    onnx = _require_onnx()
    net = pad_shortcuts_as_conv(net).eval().to("cpu", memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(net, (_example(meta, 1),), buf, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
                          opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    for key, value in (("resnet", json.dumps(meta)), ("classes", json.dumps(meta.get("classes"))),
                       ("mean", json.dumps(meta.get("mean"))), ("std", json.dumps(meta.get("std")))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "resnet"
    return proto.SerializeToString()


def onnx_session(net: nn.Module | None, meta: dict, model_bytes: bytes | None = None, threads: int | None = None,
                 spin: bool = True):
    """An ONNX Runtime CPU session for `net` (or for `model_bytes`), all graph optimisations on.

    `spin=False` makes idle worker threads sleep instead of busy-waiting, which is faster when other
    processes share the cores (measured: ResNet-50 batch 1, 3.4 -> 5.0 images/s at load 3 on 2 cores).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("the onnxruntime backend needs onnxruntime; install it with: "
                        "pip install 'resnet[onnx]'.") from None
    from .inference import default_threads

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model_bytes if model_bytes is not None else onnx_bytes(net, export_meta(meta, bn_folded=True,
                                                                                    fmt="onnx"))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def torchscript_bytes(net: nn.Module, meta: dict) -> bytes:
    """A traced TorchScript module with `resnet.json` as an extra file."""
    net = net.eval().to("cpu", memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(net, _example(meta, 2), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={META_FILE: json.dumps(meta)})
    return buf.getvalue()


def safetensors_bytes(net: nn.Module, meta: dict) -> bytes:
    from safetensors.torch import save

    from .artifacts import clean_state_dict, unwrap
    from .loading import DIGEST_KEY, META_DIGEST_KEY, META_KEY, state_digest

    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(unwrap(net).state_dict()).items()}
    meta = {**meta, DIGEST_KEY: state_digest(state)}
    text = json.dumps(meta)
    return save(state, metadata={META_KEY: text, META_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest(),
                                 "format": "resnet-model/1", "arch": meta["arch"]})


def export_model(model: nn.Module, meta: dict, fmt: str, out: str | Path, *, fold: bool | None = None,
                 calibration=None, weight_bits: int | None = None) -> Path:
    """Write `model` to `out` as `fmt` ("onnx" | "torchscript" | "safetensors"); returns the path.

    `fold=None` folds BatchNorm for onnx and torchscript and keeps it for safetensors. `calibration` (onnx
    only): batches to calibrate an int8 model on (resnet.quantize); the file is then the int8 model, its weights
    of `weight_bits` bits (default 7, which every CPU runs without overflow; 8 only for CPUs with VNNI).
    """
    if fmt not in FORMATS:
        raise UserError(f"export format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    if calibration is not None and fmt != "onnx":
        raise UserError(f"int8 export writes ONNX (run by ONNX Runtime's int8 kernels); use --format onnx, not {fmt}.")
    already = bool(meta.get("bn_folded"))
    if already and fold is False:
        raise UserError("this model's BatchNorm is already folded and cannot be unfolded; export with --fold-bn.")
    fold = (fmt != "safetensors" or already) if fold is None else fold
    net = fold_bn(model) if fold and not already else model
    doc = export_meta(meta, bn_folded=fold or already, fmt=fmt)
    if fmt == "onnx":
        data = onnx_bytes(net, doc)
        if calibration is not None:
            from .quantize import quantize_onnx, weight_bits_for

            data = quantize_onnx(data, calibration, weight_bits_for(weight_bits, portable=True))
    elif fmt == "torchscript":
        data = torchscript_bytes(net, doc)
    else:
        data = safetensors_bytes(net, doc)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; name the file to write, e.g. {out / ('model.' + fmt)}.")
    atomic_write_bytes(out, data)
    return out


def read_onnx_meta(path: str | Path) -> dict:
    """The metadata `export_model` wrote into an ONNX file."""
    onnx = _require_onnx()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["resnet"])


def read_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript export and its metadata."""
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[META_FILE])


def run_exported(path: str | Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file on `x` (ONNX Runtime for onnx, torch.jit for torchscript, load_model else)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("checking an ONNX export needs onnxruntime; install 'resnet[onnx]' or pass "
                            "--no-check.") from None
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {"input": x.contiguous().numpy()})[0])
    if fmt == "torchscript":
        module, _ = read_torchscript(path)
        with torch.inference_mode():
            return module(x)
    from .loading import load_model

    model, _ = load_model(path)
    with torch.inference_mode():
        return model(x)


def check_export(model: nn.Module, meta: dict, path: str | Path, fmt: str, x: torch.Tensor | None = None) -> float:
    """Max |logit difference| between the exported file and the eager model, on a batch of 3 (a batch size
    the export was not traced with, so the dynamic batch dimension is exercised too)."""
    return export_error(model, meta, path, fmt, x)[0]


def export_error(model: nn.Module, meta: dict, path: str | Path, fmt: str,
                 x: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the exported file against the eager model."""
    x = _example(meta, 3) if x is None else x
    with torch.inference_mode():
        ref = model.eval()(x)
    return float((run_exported(path, fmt, x) - ref).abs().max()), float(ref.abs().max())
