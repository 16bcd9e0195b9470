"""Fast inference: BatchNorm folded into the convolutions, channels_last, inference mode.

`fold_bn(model)` returns a copy in which every BatchNorm that follows a convolution is merged into that
convolution's weight and bias (y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta is itself a
convolution), so inference runs one kernel where eager PyTorch runs two. `InferenceModel` is the
predictor that `resnet eval` and `resnet predict` use; `benchmarks/infer.py` measures it.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .errors import UserError
from .models.blocks import PadShortcut

BACKENDS = ("auto", "torch", "compile", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    return precision


def resolve_precision(precision: str, device: str | torch.device = "cpu", backend: str = "auto") -> str:
    """The precision "auto" stands for: bf16 on a CPU that computes in it (AVX512_BF16 or AMX) when the
    backend is PyTorch's (auto, torch, compile), where it measured fastest at the same accuracy
    (docs/inference.md); fp32 everywhere else (on GPUs, and for --backend onnxruntime). Other values are
    returned as they are, once checked."""
    from .machine import has_native_bf16

    if check_precision(precision) != "auto":
        return precision
    cpu = torch.device(device).type == "cpu"
    return "bf16" if cpu and backend in ("auto", "torch", "compile") and has_native_bf16() else "fp32"


def check_bf16_device(device: torch.device) -> None:
    """bf16 inference where the hardware computes in bf16; elsewhere a clear refusal, not a slow emulation."""
    from .machine import has_native_bf16

    if device.type == "cpu" and not has_native_bf16():
        raise UserError("bf16 inference needs a CPU with AVX512_BF16 or AMX, and this one has neither (bf16 "
                        "would be emulated, slower than fp32); use --precision fp32, or int8.")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} does not compute in bf16; use --precision fp32.")


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Merge `bn` into `conv` in place (computed in float64, stored in the conv's dtype)."""
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = bn.bias.detach().double() + (bias - bn.running_mean.double()) * scale
    conv.weight = nn.Parameter((w * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with each BatchNorm that directly follows a Conv2d folded into it.

    Pairs are found structurally: attributes `convN` + `bnN` of one module (the stem and every block) and
    consecutive (Conv2d, BatchNorm2d) entries of an `nn.Sequential` (projection shortcuts). The folded
    BatchNorm becomes an `nn.Identity`, so the module's forward code is unchanged.
    """
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        children = dict(module.named_children())
        if isinstance(module, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:], strict=False):
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                    _fold_pair(children[a], children[b])
                    setattr(module, b, nn.Identity())
            continue
        for name, child in children.items():
            if name.startswith("conv") and isinstance(child, nn.Conv2d):
                bn = children.get("bn" + name[4:])
                if isinstance(bn, nn.BatchNorm2d):
                    _fold_pair(child, bn)
                    setattr(module, "bn" + name[4:], nn.Identity())
    return model


def pad_shortcuts_as_conv(model: nn.Module) -> nn.Module:
    """A copy of `model` with every option-A shortcut (`PadShortcut`) written as a 1x1 strided convolution
    whose weight is the identity on the input's channels and zero on the new ones.

    The result is exact (each output is 1 * x + sums of 0 * x, which is x in floating point for finite x),
    so it changes speed, not logits. Why: in an ONNX graph the strided slice and channel pad are separate
    nodes that force ONNX Runtime out of its blocked (NCHWc) layout and back around every down-sampling
    block, and keep it from fusing the block's last convolution with the addition and ReLU. As a
    convolution, the whole ResNet-20 graph runs as fused convolutions. Measured on 2 cores, batch 256:
    ONNX Runtime's non-convolution time drops from 34 to 0.4 ms per batch (docs/inference.md).
    """
    model = copy.deepcopy(model)
    ref = next(model.parameters())
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PadShortcut):
                conv = nn.Conv2d(child.in_chs, child.out_chs, 1, stride=child.stride, bias=False)
                weight = torch.zeros(child.out_chs, child.in_chs, 1, 1, dtype=ref.dtype, device=ref.device)
                idx = torch.arange(child.in_chs)
                weight[idx, idx] = 1.0
                conv.weight = nn.Parameter(weight, requires_grad=False)
                setattr(module, name, conv)
    return model


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_threads() -> int:
    """The cores this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; a CUDA device that is not there is a user error. Under
    torchrun, "auto" and "cuda" mean this process's GPU (cuda:LOCAL_RANK), made the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):  # mps, xla, meta, ...: torch.device accepts them, our code does not
        raise UserError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but this PyTorch sees no CUDA GPU; use --device cpu.")
    if device.type == "cuda":
        if device.index is None and "LOCAL_RANK" in os.environ:  # else every rank would share GPU 0
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


class _TunedSession:
    """ONNX Runtime sessions for one graph with different thread settings; the first calls time each in
    turn and the fastest per pixel is kept (calls differ in batch and, for multi-scale views, in image
    size). Why: on a machine shared with other work, one thread or sleeping (not spinning) workers can be
    twice as fast as all cores spinning, and on a quiet one all cores win, so the choice is measured where
    the model runs, not fixed."""

    TRIALS = 3  # timed calls per candidate, after one untimed warm-up call each, candidate after candidate

    def __init__(self, net: nn.Module, meta: dict, threads: int | None, calibration=None,
                 weight_bits: int | None = None):
        from .export import export_meta, onnx_bytes, onnx_session

        data = onnx_bytes(net, export_meta(meta, bn_folded=True, fmt="onnx"))
        if calibration is not None:  # int8: the same graph, quantized with ranges measured on these batches
            from .quantize import quantize_onnx

            data = quantize_onnx(data, calibration, weight_bits)
        if threads:
            configs = [(threads, True)]
        else:
            n = default_threads()
            configs = [(n, True), (n, False)] + ([(1, True)] if n > 1 else [])
        self.candidates = [(cfg, onnx_session(None, meta, data, threads=cfg[0], spin=cfg[1])) for cfg in configs]
        self.times: list[list[float]] = [[] for _ in self.candidates]
        self.chosen: tuple[int, bool] | None = configs[0] if len(configs) == 1 else None

    def run(self, x):
        import time

        if self.chosen is not None:
            return self.candidates[0][1].run(None, {"input": x})[0]
        # One candidate at a time, its first call untimed: a session just switched away from keeps its
        # worker threads spinning for a while, and a call timed against them would run up to 20% slow.
        i = next(j for j, t in enumerate(self.times) if len(t) <= self.TRIALS)
        start = time.perf_counter()
        out = self.candidates[i][1].run(None, {"input": x})[0]
        self.times[i].append((time.perf_counter() - start) / max(1, x.shape[0] * x.shape[-2] * x.shape[-1]))
        if all(len(t) > self.TRIALS for t in self.times):
            best = min(range(len(self.candidates)), key=lambda j: sorted(self.times[j][1:])[self.TRIALS // 2])
            self.candidates = [self.candidates[best]]
            self.chosen = self.candidates[0][0]
        return out


def _has_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class InferenceModel:
    """A trained model prepared for fast CPU (or GPU) inference; call it on normalised float batches.

    backend "torch": folded BN, channels_last, `torch.inference_mode`. "compile": the same through
    `torch.compile`. "onnxruntime": the folded model exported to ONNX and run by ONNX Runtime (on the CPU
    the fastest by measurement, see docs/inference.md). "auto" (default): onnxruntime on the CPU when it
    is installed, else torch.

    precision "int8" (opt-in; onnxruntime only): the ONNX model statically quantized, its activation ranges
    measured on `calibration`, an iterable of normalised float batches as the model sees them
    (`resnet.quantize.calibration_batches` draws them from a data split), its weights of `weight_bits` bits
    (default: 8 where this CPU has VNNI, else 7; the choice is in `.weight_bits`). See resnet/quantize.py.

    precision "bf16" (torch or compile backends): the folded model's weights and activations in bfloat16, on
    CPUs that compute in it (AVX512_BF16, AMX) and on GPUs; logits are returned as float32. precision "auto"
    (what `resnet eval` and `resnet predict` ask for): bf16 on such a CPU, else fp32 (`resolve_precision`);
    `.precision` says which. The default here stays "fp32": a library call does not change numerics by CPU.

    The torch backend on the CPU runs batches of the model's input size through `resnet.packed` (weights in
    oneDNN's layout once, ReLU and additions fused; `.packed` says whether it applies), others as they are.

    The `resnet` command also calls `resnet.machine.keep_freed_memory()` (process-wide malloc settings),
    which made the torch backend 22-41% faster on the CPU; a program that embeds this class may call it too.
    """

    def __init__(self, model: nn.Module, meta: dict | None = None, *, backend: str = "auto",
                 device: str | torch.device = "cpu", channels_last: bool = True, fold: bool = True,
                 threads: int | None = None, precision: str = "fp32", calibration=None,
                 weight_bits: int | None = None):
        from .quantize import weight_bits_for

        if backend not in BACKENDS:
            raise UserError(f"inference backend must be one of {', '.join(BACKENDS)}, not '{backend}'.")
        self.device = torch.device(device)
        precision = self.precision = resolve_precision(precision, self.device, backend)
        self.meta = dict(meta or {})
        if precision == "int8":
            if backend not in ("auto", "onnxruntime") or self.device.type != "cpu":
                raise UserError(f"int8 inference runs on ONNX Runtime on the CPU; use --backend auto (or "
                                f"onnxruntime) and --device cpu, not {backend} on {self.device}.")
            if "input_size" not in self.meta:
                raise UserError("int8 inference needs the model's metadata (meta with input_size, as load_model "
                                "returns it).")
            if not _has_onnxruntime():
                raise UserError("int8 inference needs onnx and onnxruntime; install them with: "
                                "pip install 'resnet[onnx]'.")
            if calibration is None:
                raise UserError("int8 inference needs calibration images (batches as the model sees them) to "
                                "measure its activation ranges; pass calibration=.")
            backend = "onnxruntime"
        self.weight_bits = weight_bits_for(weight_bits) if precision == "int8" else None
        if precision == "bf16":
            if backend not in ("auto", "torch", "compile"):
                raise UserError(f"bf16 inference runs on PyTorch; use --backend auto, torch or compile, not "
                                f"{backend}.")
            check_bf16_device(self.device)
            backend = "torch" if backend == "auto" else backend
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if backend == "auto":  # the ONNX export needs the input size that model.json records
            usable = self.device.type == "cpu" and "input_size" in self.meta and _has_onnxruntime()
            backend = "onnxruntime" if usable else "torch"
        elif backend == "onnxruntime" and self.device.type != "cpu":
            raise UserError(f"the onnxruntime backend runs on the CPU; use --backend torch (or auto) for "
                            f"{self.device}.")
        elif backend == "onnxruntime" and "input_size" not in self.meta:
            raise UserError("the onnxruntime backend needs the model's metadata (meta with input_size, as "
                            "load_model returns it); pass meta, or use backend='torch'.")
        self.backend = backend
        self.channels_last = channels_last
        net = fold_bn(model) if fold else copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        net = net.to(self.device, self.dtype)  # folded in fp32 first, then rounded once
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.module = net
        self._ort = None
        self._fn = net
        # On the CPU, the torch backend runs inputs of the model's own size through oneDNN with weights
        # reordered once and ReLU and additions fused (resnet.packed); other sizes through `net`.
        self._packed, self._packed_hw = None, None
        size = self.meta.get("input_size")
        if backend == "torch" and self.device.type == "cpu" and fold and channels_last and size:
            from .packed import pack

            self._packed = pack(net, size)
            self._packed_hw = tuple(size[1:])
        if backend == "compile":
            self._fn = torch.compile(net)
        elif backend == "onnxruntime":
            self._ort = _TunedSession(net, self.meta, threads, calibration if precision == "int8" else None,
                                      self.weight_bits)

    @property
    def packed(self) -> bool:
        return self._packed is not None

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the CPU for onnxruntime, else on `device`) of a batch N x C x H x W."""
        if self._ort is not None:
            return torch.from_numpy(self._ort.run(x.detach().cpu().float().contiguous().numpy()))
        x = x.to(self.device, self.dtype, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = self._packed if self._packed is not None and tuple(x.shape[-2:]) == self._packed_hw else self._fn
        with torch.inference_mode():
            return fn(x).float()
