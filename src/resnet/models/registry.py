"""The model registry: every named network of the paper as one row of a table.

A named model only states its family, block type and stage repeats; options (shortcut, variant,
num_classes, in_chans, zero_init_residual) are keyword arguments, never more names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError, did_you_mean
from .blocks import SHORTCUTS, VARIANTS
from .resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "imagenet" | "cifar"
    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    residual: bool
    # The paper's figures for the default options: multiply-adds (Table 1), parameters and CIFAR-10
    # test error in % (Table 6). None where the paper gives none.
    paper: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        per_block = 3 if self.block == "bottleneck" else 2
        return per_block * sum(self.layers) + 2

    @property
    def widths(self) -> tuple[int, ...]:
        return (64, 128, 256, 512) if self.family == "imagenet" else (16, 32, 64)

    def defaults(self) -> dict:
        return {
            "num_classes": 1000 if self.family == "imagenet" else 10,
            "in_chans": 3,
            "shortcut": ("B" if self.family == "imagenet" else "A") if self.residual else None,
            "variant": "v1",
            "zero_init_residual": False,
        }


def _imagenet(name, block, layers, residual, macs_g):
    return ModelSpec(name, "imagenet", block, layers, residual, {"macs": macs_g * 1e9})


def _cifar(n, residual, params_m=None, err=None):
    prefix = "resnet" if residual else "plain"
    paper = {"params": params_m * 1e6, "top1_err": err} if residual else {}
    return ModelSpec(f"{prefix}{6 * n + 2}", "cifar", "basic", (n, n, n), residual, paper)


_SPECS = [
    # Table 1 (multiply-adds at 224x224, "FLOPs" in the paper).
    _imagenet("resnet18", "basic", (2, 2, 2, 2), True, 1.8),
    _imagenet("resnet34", "basic", (3, 4, 6, 3), True, 3.6),
    _imagenet("resnet50", "bottleneck", (3, 4, 6, 3), True, 3.8),
    _imagenet("resnet101", "bottleneck", (3, 4, 23, 3), True, 7.6),
    _imagenet("resnet152", "bottleneck", (3, 8, 36, 3), True, 11.3),
    _imagenet("plain18", "basic", (2, 2, 2, 2), False, 1.8),
    _imagenet("plain34", "basic", (3, 4, 6, 3), False, 3.6),
    # Table 6 (parameters; CIFAR-10 test error of one run each, except 110: best of 5 runs, mean 6.61±0.16).
    _cifar(3, True, 0.27, 8.75),
    _cifar(5, True, 0.46, 7.51),
    _cifar(7, True, 0.66, 7.17),
    _cifar(9, True, 0.85, 6.97),
    _cifar(18, True, 1.7, 6.43),
    _cifar(200, True, 19.4, 7.93),
    _cifar(3, False),
    _cifar(5, False),
    _cifar(7, False),
    _cifar(9, False),
    _cifar(18, False),
]
MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
OPTIONS = ("num_classes", "in_chans", "shortcut", "variant", "zero_init_residual")


def list_models(family: str | None = None) -> list[str]:
    """Every registered model name, in table order (optionally one family: "imagenet" or "cifar")."""
    return [n for n, s in MODELS.items() if family is None or s.family == family]


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'{did_you_mean(name, MODELS)}; "
                        f"run 'resnet models' to see them all.")
    return MODELS[name]


def resolve_options(name: str, **options) -> dict:
    """The full, validated option set of a model: defaults overridden by `options`."""
    spec = model_spec(name)
    for key in options:
        if key not in OPTIONS:
            raise UserError(f"unknown option '{key}' for model '{name}'{did_you_mean(key, OPTIONS)}; "
                            f"valid options are {', '.join(OPTIONS)}.")
    resolved = spec.defaults()
    resolved.update({k: v for k, v in options.items() if v is not None})
    if not spec.residual:
        if options.get("shortcut") is not None:
            raise UserError(f"model '{name}' is a plain network and has no shortcuts; drop the shortcut "
                            f"option or use the residual model '{name.replace('plain', 'resnet')}'.")
        if resolved["zero_init_residual"]:
            raise UserError(f"model '{name}' is a plain network; zero_init_residual needs a residual model.")
    else:
        shortcut = str(resolved["shortcut"]).upper()
        if shortcut not in SHORTCUTS:
            raise UserError(f"shortcut must be one of A, B, C (Table 3), not '{resolved['shortcut']}'.")
        resolved["shortcut"] = shortcut
    if resolved["variant"] not in VARIANTS:
        raise UserError(f"variant must be 'v1' (stride on the first 1x1, as in the paper) or 'v1.5' "
                        f"(stride on the 3x3, as torchvision), not '{resolved['variant']}'.")
    for key in ("num_classes", "in_chans"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive whole number, not {value!r}.")
    if not isinstance(resolved["zero_init_residual"], bool):
        raise UserError(f"zero_init_residual must be true or false, not {resolved['zero_init_residual']!r}.")
    return resolved


def create_model(name: str, **options) -> ResNet:
    return build_model(name, init_weights=True, **options)


def build_model(name: str, *, init_weights: bool = True, **options) -> ResNet:
    """Build a named network of the paper, e.g. `create_model("resnet50", variant="v1.5")`.

    Options: num_classes, in_chans, shortcut ("A" | "B" | "C"; residual nets only), variant ("v1" |
    "v1.5"; only bottleneck nets differ), zero_init_residual (a departure from the paper, off by default).
    """
    spec = model_spec(name)
    opts = resolve_options(name, **options)
    return ResNet(
        block=spec.block,
        layers=spec.layers,
        widths=spec.widths,
        stem=spec.family,
        num_classes=opts["num_classes"],
        in_chans=opts["in_chans"],
        shortcut=opts["shortcut"] or "B",
        variant=opts["variant"],
        residual=spec.residual,
        zero_init_residual=opts["zero_init_residual"],
        init_weights=init_weights,
    )
