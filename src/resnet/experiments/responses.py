"""Layer responses (Fig. 7): the standard deviation of every 3x3 layer's output, after its BN and before
the ReLU or the shortcut addition, over a data split (the test split; the validation split when there is none).

We take the std over every element of a layer's response (images, channels, positions) of the whole
split, accumulated in float64; the paper does not say how it pooled, and this choice compares layers and
networks on one scale.
"""

from __future__ import annotations

import torch
from torch import nn


def three_by_three_bns(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BN) for every 3x3 conv's BN, in forward order: `convK` is followed by `bnK` in our blocks."""
    modules = dict(model.named_modules())
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            parent, _, leaf = name.rpartition(".")
            bn_name = ".".join(p for p in (parent, leaf.replace("conv", "bn")) if p)
            if isinstance(modules.get(bn_name), nn.BatchNorm2d):
                out.append((bn_name, modules[bn_name]))
    return out


@torch.inference_mode()
def response_stds(model: nn.Module, batches) -> list[tuple[str, float]]:
    """(layer name, std of its response) for every 3x3 layer, over all `(x, y)` batches given."""
    layers = three_by_three_bns(model)
    sums = torch.zeros(len(layers), 3, dtype=torch.float64)  # count, sum, sum of squares

    def hook(i):
        def record(_m, _inp, out):
            o = out.detach().double()
            sums[i] += torch.stack([torch.tensor(float(o.numel()), dtype=torch.float64), o.sum(), (o * o).sum()])
        return record

    handles = [bn.register_forward_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        model.eval()
        for x, _y in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    n, s, ss = sums[:, 0], sums[:, 1], sums[:, 2]
    var = (ss / n - (s / n) ** 2).clamp_min(0)
    return [(name, float(v.sqrt())) for (name, _), v in zip(layers, var, strict=True)]
