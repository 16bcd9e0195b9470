"""Parameters and multiply-adds, per layer and per model, at a model's natural input size.

The paper's "FLOPs" (Table 1) are multiply-adds of the convolutions and the fc layer; BN, ReLU, the
shortcut additions and pooling are not counted. Tools that count a multiply-add as two FLOPs report
twice these figures. Shapes come from one forward pass at batch 1 on the meta device (nothing is computed).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .models.registry import build_model, model_spec, resolve_options

NATURAL_SIZE = {"imagenet": 224, "cifar": 32}

# (params, multiply-adds) of every registered model with its default options, as `_traced_cost` computes
# them; `resnet models` reads these instead of building 18 models (seconds). A test re-traces every entry,
# so a change to an architecture or a default that is not carried here fails the suite.
DEFAULT_COSTS = {
    "resnet18": (11689512, 1814073344), "resnet34": (21797672, 3663761408),
    "resnet50": (25557032, 3857973248), "resnet101": (44549160, 7570194432),
    "resnet152": (60192808, 11282415616), "plain18": (11515688, 1794805760),
    "plain34": (21623848, 3644493824), "resnet20": (269722, 40551040), "resnet32": (464154, 68862592),
    "resnet44": (658586, 97174144), "resnet56": (853018, 125485696), "resnet110": (1727962, 252887680),
    "resnet1202": (19421274, 2829238912), "plain20": (269722, 40551040), "plain32": (464154, 68862592),
    "plain44": (658586, 97174144), "plain56": (853018, 125485696), "plain110": (1727962, 252887680),
}


@dataclass
class LayerCost:
    name: str
    kind: str  # "conv" | "fc"
    out_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class StageCost:
    name: str  # "stem", "layer1", ..., "head"
    out_shape: tuple[int, ...]
    params: int
    macs: int


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out[0].numel() * (module.in_channels // module.groups) * kh * kw
    return module.in_features * module.out_features  # nn.Linear


def _same_shape(x: torch.Tensor) -> torch.Tensor:
    return x


def layer_costs(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerCost]:
    """Every conv and fc layer with its output shape (batch 1), parameters and multiply-adds."""
    costs: list[LayerCost] = []
    hooks = []
    device = next(model.parameters()).device
    # On the meta device BatchNorm goes through PyTorch's Python reference implementation (~5 ms a call,
    # most of `resnet models`' time); it keeps shapes, so the trace skips it there.
    skipped = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if device.type == "meta" else []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            def hook(mod, _inp, out, name=name):
                costs.append(LayerCost(name, "conv" if isinstance(mod, nn.Conv2d) else "fc",
                                       tuple(out.shape[1:]), sum(p.numel() for p in mod.parameters()),
                                       _layer_macs(mod, out)))
            hooks.append(module.register_forward_hook(hook))
    for m in skipped:
        m.forward = _same_shape
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_size), device=device))
    finally:
        for h in hooks:
            h.remove()
        for m in skipped:
            del m.forward
    return costs


def _fresh_model(name: str, **options) -> nn.Module:
    # Only shapes matter: skip our initialisation and trace on the meta device, which computes nothing.
    # (Building inside a `torch.device("meta")` context is slower here: it intercepts every call.)
    return build_model(name, init_weights=False, **options).to("meta")


def natural_input(name: str, **options) -> tuple[int, int, int]:
    size = NATURAL_SIZE[model_spec(name).family]
    return (resolve_options(name, **options)["in_chans"], size, size)


def model_cost(name: str, **options) -> dict:
    """Parameters (all learnable, BN included) and multiply-adds of a named model at its natural size."""
    return dict(_model_cost(name, tuple(sorted(options.items()))))


def _model_cost(name: str, options: tuple) -> dict:
    if not options and name in DEFAULT_COSTS:
        params, macs = DEFAULT_COSTS[name]
        return {"params": params, "macs": macs, "input_size": natural_input(name)}
    return _traced_cost(name, options)


@functools.lru_cache(maxsize=64)
def _traced_cost(name: str, options: tuple) -> dict:
    options = dict(options)
    model = _fresh_model(name, **options)
    layers = layer_costs(model, natural_input(name, **options))
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "macs": sum(c.macs for c in layers), "input_size": natural_input(name, **options)}


def stage_costs(name: str, **options) -> list[StageCost]:
    """Per stage (stem, layer1.., head): output shape at batch 1, parameters and multiply-adds."""
    model = _fresh_model(name, **options)
    input_size = natural_input(name, **options)
    shapes: dict[str, tuple[int, ...]] = {}
    groups = {"stem": [model.conv1, model.bn1, model.maxpool], "head": [model.fc]}
    groups.update({n: [getattr(model, n)] for n in model.stage_names})
    hooks = [model.maxpool.register_forward_hook(lambda m, i, o: shapes.__setitem__("stem", tuple(o.shape[1:]))),
             model.fc.register_forward_hook(lambda m, i, o: shapes.__setitem__("head", tuple(o.shape[1:])))]
    for n in model.stage_names:
        hooks.append(getattr(model, n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:]))))
    layers = layer_costs(model, input_size)  # runs the forward that fills `shapes`
    for h in hooks:
        h.remove()

    def owner(layer_name: str) -> str:
        top = layer_name.split(".")[0]
        return "stem" if top == "conv1" else ("head" if top == "fc" else top)

    out = []
    for group, modules in groups.items():
        params = sum(p.numel() for m in modules for p in m.parameters())
        macs = sum(c.macs for c in layers if owner(c.name) == group)
        out.append(StageCost(group, shapes[group], params, macs))
    order = ["stem", *model.stage_names, "head"]
    return sorted(out, key=lambda s: order.index(s.name))


def as_dicts(items: list) -> list[dict]:
    return [asdict(i) for i in items]
