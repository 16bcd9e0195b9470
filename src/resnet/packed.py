"""CPU inference with each convolution's weights in oneDNN's layout once, and ReLU and the residual
addition done inside the convolution that precedes them.

PyTorch's eager convolution reorders its weight into oneDNN's blocked layout on every call: for ResNet-50
in bf16 that is ~50 MB rearranged per batch, most of the time at batch 1. `pack(net, input_size)` returns a
copy of a BatchNorm-folded, channels_last ResNet whose convolutions hold their weights reordered once
(`torch.ops.mkldnn._reorder_convolution_weight`) and run through `torch.ops.mkldnn._convolution_pointwise`,
with the ReLU that follows fused in, and the block's last convolution computing relu(conv(x) + shortcut)
in one call. These are the operators `torch.compile`'s CPU backend emits for the same graph; here they
are used without compiling. Measured on a 2-core Zen 4 (docs/inference.md): ResNet-50 at batch 1, bf16
43.1 against 29.1 images/s, fp32 24.1 against 15.5.

The weights are reordered for one input height and width (the model's `input_size`); other sizes run
slower through them (2.9x slower at 320x320 in one measurement), so callers use the packed copy for that
size only. The copy is checked against the net it came from on an example before it is returned;
anything unexpected (a PyTorch without these operators, a module this file does not know) gives None, and
the caller keeps the plain net.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models.blocks import BasicBlock, Bottleneck, PadShortcut
from .models.resnet import ResNet


def available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_reorder_convolution_weight"))


class PackedConv(nn.Module):
    """A Conv2d whose weight is in oneDNN's layout for `input_size`, optionally followed by ReLU, or (given
    a second input) computing relu(conv(x) + residual)."""

    def __init__(self, conv: nn.Conv2d, input_size: list[int], relu: bool):
        super().__init__()
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("only zero padding given as numbers is packed")
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), *self.args[:3], conv.groups, input_size)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.unary = "relu" if relu else "none"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight, self.bias, *self.args,
                                                           self.unary, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, self.packed_weight, self.bias,
                                                              *self.args, "add", 1.0, "relu", [], "")


class _PackedBlock(nn.Module):
    """A BasicBlock or Bottleneck: its convolutions packed, each ReLU fused, the addition in the last one."""

    def __init__(self, block: BasicBlock | Bottleneck, convs: list[PackedConv], downsample: nn.Module | None):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.residual = block.residual
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        if not self.residual:
            return self.convs[-1](out)
        return self.convs[-1](out, x if self.downsample is None else self.downsample(x))


def _conv_inputs(net: nn.Module, example: torch.Tensor) -> dict[str, list[int]]:
    """The input shape of every Conv2d of `net` (by module name) on `example`."""
    sizes: dict[str, list[int]] = {}
    names = {m: n for n, m in net.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(names[mod], list(args[0].shape)))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _folded(*modules: nn.Module) -> bool:
    return all(isinstance(m, nn.Identity) for m in modules)


def _pack_shortcut(module: nn.Module | None, name: str, sizes: dict) -> nn.Module | None:
    if module is None or isinstance(module, PadShortcut):
        return module
    if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
            and _folded(module[1]):
        return PackedConv(module[0], sizes[f"{name}.0"], relu=False)
    raise ValueError(f"unknown shortcut {type(module).__name__}")


def _pack_block(block: nn.Module, name: str, sizes: dict) -> _PackedBlock:
    if type(block) is BasicBlock and _folded(block.bn1, block.bn2):
        names = ["conv1", "conv2"]
    elif type(block) is Bottleneck and _folded(block.bn1, block.bn2, block.bn3):
        names = ["conv1", "conv2", "conv3"]
    else:
        raise ValueError(f"unknown block {type(block).__name__}")
    last = names[-1]
    # The last convolution fuses the addition and its ReLU; without a shortcut (a plain net) just the ReLU.
    convs = [PackedConv(getattr(block, n), sizes[f"{name}.{n}"], relu=n != last or not block.residual)
             for n in names]
    return _PackedBlock(block, convs, _pack_shortcut(block.downsample, f"{name}.downsample", sizes))


def pack(net: nn.Module, input_size: list[int] | tuple[int, ...]) -> nn.Module | None:
    """A packed copy of `net` (a ResNet with BatchNorm folded, in eval mode, on the CPU, in its inference
    dtype) for inputs of `input_size` = [C, H, W]; None when it cannot be packed or does not match `net`."""
    if not available() or type(net) is not ResNet or not _folded(net.bn1):
        return None
    ref = next(net.parameters())
    if ref.device.type != "cpu":
        return None
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(ref.dtype)
    example = example.contiguous(memory_format=torch.channels_last)
    try:
        sizes = _conv_inputs(net, example[:1])
        out = copy.deepcopy(net)
        out.conv1 = PackedConv(net.conv1, sizes["conv1"], relu=True)
        out.relu = nn.Identity()  # fused into the stem's convolution
        for stage_name, stage in net.named_children():
            if isinstance(stage, nn.Sequential) and stage_name.startswith("layer"):
                setattr(out, stage_name, nn.Sequential(*(_pack_block(b, f"{stage_name}.{i}", sizes)
                                                         for i, b in enumerate(stage))))
        with torch.inference_mode():
            want, got = net(example).float(), out(example).float()
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError):
        return None
    # The fused kernels round once where the plain net rounds after each op: equal up to the dtype's rounding.
    tol = (1e-4 if ref.dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
    return out if float((want - got).abs().max()) <= tol else None
