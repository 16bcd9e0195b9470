"""The training configuration: one flat, typed dataclass, recipes in YAML, strict `key=value` overrides.

A recipe is a YAML mapping of these keys (every hyperparameter stated, with its unit and reason in a
comment). Overrides use the same keys; an unknown key or a value of the wrong type is a `UserError`
naming the closest keys. The resolved config is saved with the run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from ..errors import UserError, did_you_mean

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Every setting of a training run. Iteration counts and `lr` are stated for `ref_batch_size`."""

    # what the recipe is
    recipe: str = "custom"
    description: str = ""
    paper: bool = False  # true only when every setting follows the paper
    # data (see resnet.data.load_dataset / make_loader)
    data: str = "cifar10"
    data_dir: str | None = None
    cache_dir: str | None = None
    in_chans: int = 3
    val_size: int | None = None
    data_seed: int = 0
    augment: str = "cifar"
    eval_view: str | None = None
    num_workers: int | None = None
    strict_data: bool = False
    mean: list[float] | None = None  # per-channel normalisation instead of the training split's own statistics
    std: list[float] | None = None
    # model (see resnet.create_model)
    arch: str = "resnet20"
    shortcut: str | None = None
    variant: str = "v1"
    zero_init_residual: bool = False
    init_from: str | None = None  # weights to start from (fine-tuning): a run, model.safetensors, checkpoint or .pth
    # optimisation
    batch_size: int = 128  # images per step over all processes
    ref_batch_size: int = 128  # lr and every iteration count below are stated for this batch
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    schedule: str = "multistep"  # multistep | plateau | cosine | onecycle
    milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    warmup_lr: float = 0.0  # > 0: constant lr until the training error falls below warmup_until_train_err
    warmup_until_train_err: float = 0.8
    ramp_iters: int = 0  # linear ramp from 0 over the first iterations, before any schedule
    plateau_patience: int = 3  # evaluations without improvement before the lr is divided
    plateau_threshold: float = 0.001  # smallest drop of the validation top-1 error that counts
    min_lr: float = 0.0
    max_iters: int = 64000
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights
    tta_flip: bool = False  # evaluate on the image and its mirror, average the logits
    # runtime
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    threads: int | None = None
    seed: int = 0
    eval_every: int = 1000
    eval_batch_size: int = 256
    log_every: int = 50
    checkpoint_every: int = 1000

    def to_dict(self) -> dict:
        return asdict(self)


# Keys that may differ between a run and its resumption without changing what is computed. The memory
# layout and compilation change only rounding: a run resumed with another `channels_last` or `compile`
# equals the uninterrupted one up to rounding, not bit for bit (the same command is bit for bit).
RUNTIME_KEYS = frozenset({"num_workers", "threads", "eval_batch_size", "cache_dir", "data_dir",
                          "description", "channels_last", "compile"})
_PATH_KEYS = ("init_from",)
_TYPES = typing.get_type_hints(TrainConfig)
KEYS = tuple(f.name for f in fields(TrainConfig))


# Names other training scripts use for our settings, which spelling distance does not find.
_ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "batch": "batch_size",
            "model": "arch", "dataset": "data", "epochs": "max_iters (iterations, not epochs)",
            "iters": "max_iters", "steps": "max_iters", "amp": "precision=bf16 or fp16"}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:  # list[int] reads as 'list' through __name__
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


class _Loader(yaml.SafeLoader):
    """YAML as people mean it in settings: YAML 1.1 would read 064000 as octal (26624), 1:30 as base 60
    (90) and 0x40 as hex; here only plain decimal digits are whole numbers (the rest stay text, so a
    number setting refuses them). A key given twice in one mapping is an error, not 'the last one wins'."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key '{key}' is given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                              list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects are built


def coerce(key: str, value):
    """`value` checked (and widened: int -> float) against the declared type of `key`."""
    if key not in _TYPES:
        hint = f" (did you mean {_ALIASES[key]}?)" if key in _ALIASES else did_you_mean(key, KEYS)
        raise UserError(f"unknown setting '{key}'{hint}; 'resnet train --help' lists "
                        f"the settings and docs/training.md explains them.")
    tp = _TYPES[key]
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for option in options:
        ok, out = _try(option, value)
        if ok:
            # 'runs/a/' and 'runs/a' name the same weights; one spelling keeps a resumed run's settings equal
            return os.path.normpath(out) if key in _PATH_KEYS and out else out
    wanted = " or ".join(_type_name(o) for o in options)
    raise UserError(f"setting '{key}' must be {wanted}, not {value!r}.")


def _try(tp, value):
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as text; it is a float to everyone else
            try:
                value = float(value)
            except ValueError:
                return False, None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False, None
        items = [_try(inner, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return False, None


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value); the value is read as YAML (`lr=0.05`, `milestones=[100,200]`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override '{text}' is not of the form key=value (e.g. lr=0.05).")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if _TYPES.get(key) in (str, str | None) and value is not None and not isinstance(value, str):
        value = raw.strip()  # data=123 or arch=... stay text
    return key, coerce(key, value)


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    folder = resources.files("resnet") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    # A shipped recipe's bare name means that recipe even if a file or folder of that name is in the current
    # folder (write ./NAME for the file): `--recipe quickstart --out quickstart` must resume where it ran.
    shipped = name_or_path in list_recipes() and os.sep not in name_or_path and "/" not in name_or_path
    if not shipped and path.is_dir():
        raise UserError(f"recipe '{name_or_path}' is a directory; give a recipe name "
                        f"({', '.join(list_recipes()[:4])}, ...) or a YAML file path.")
    if not shipped and (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        if not path.is_file():
            raise UserError(f"recipe file '{name_or_path}' does not exist; give a recipe name "
                            f"({', '.join(list_recipes()[:4])}, ...) or a YAML file path.")
        try:
            text, name = path.read_text(encoding="utf-8"), path.stem
        except UnicodeDecodeError:
            raise UserError(f"recipe file '{name_or_path}' is not text (a YAML recipe is); give a recipe name "
                            f"or a YAML file path.") from None
    else:
        names = list_recipes()
        if name_or_path not in names:
            raise UserError(f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)}; "
                            f"the recipes are {', '.join(names)}.")
        text = (resources.files("resnet") / "recipes" / f"{name_or_path}.yaml").read_text()
        name = name_or_path
    try:
        doc = _yaml(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe '{name_or_path}' is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(doc, dict):
        raise UserError(f"recipe '{name_or_path}' must be a mapping of settings, not {type(doc).__name__}.")
    return name, doc


def load_recipe(name_or_path: str, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """A recipe (shipped name or YAML path) with strict `key=value` overrides applied and checked."""
    name, doc = _read_recipe(name_or_path)
    values = {"recipe": name}
    for key, value in doc.items():
        values[key] = coerce(str(key), value)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a config saved with a run (unknown keys are an error, so old files fail loudly)."""
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})


_SAME_PLACE_KEYS = ("data", "init_from")  # a path given relative in one command and absolute in the next


def _same_place(a, b) -> bool:
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # a dataset name, or a path that is gone: only the same spelling is the same
        return False


def changed_settings(old: dict, new: dict) -> list[str]:
    """The settings that differ between a run's saved config and a command's, sorted, ignoring the ones that
    may change between a run and its resumption (RUNTIME_KEYS). Data and weight paths count as the same when
    they name the same file or folder, however spelled."""
    keys = sorted((set(old) | set(new)) - RUNTIME_KEYS)
    return [k for k in keys if not (_same_place if k in _SAME_PLACE_KEYS else operator.eq)(old.get(k), new.get(k))]


_CHOICES = {
    "precision": PRECISIONS,
    "device": DEVICES,
    "optimizer": ("sgd",),
    "schedule": ("multistep", "plateau", "cosine", "onecycle"),
    "augment": ("cifar", "imagenet", "none"),
}
_AT_LEAST_OR_NULL = {"threads": 1, "num_workers": 0}  # null: the default for this machine
_POSITIVE = ("batch_size", "ref_batch_size", "max_iters", "eval_every", "log_every", "checkpoint_every",
             "eval_batch_size", "in_chans")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks a type cannot express; each failure is one sentence."""
    for key, choices in _CHOICES.items():
        value = getattr(cfg, key)
        if value not in choices:
            raise UserError(f"setting '{key}' must be one of {', '.join(choices)}, not '{value}'"
                            f"{did_you_mean(str(value), choices)}.")
    for key in _POSITIVE:
        if getattr(cfg, key) < 1:
            raise UserError(f"setting '{key}' must be at least 1, not {getattr(cfg, key)}.")
    if cfg.lr <= 0:
        raise UserError(f"setting 'lr' must be positive, not {cfg.lr}.")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"setting 'ema_decay' must be in [0, 1), not {cfg.ema_decay}.")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"setting 'label_smoothing' must be in [0, 1), not {cfg.label_smoothing}.")
    for key, least in _AT_LEAST_OR_NULL.items():
        value = getattr(cfg, key)
        if value is not None and value < least:
            raise UserError(f"setting '{key}' must be at least {least} (or null for the default), not {value}.")
    for key in ("momentum", "weight_decay", "warmup_lr", "min_lr", "ramp_iters"):
        if getattr(cfg, key) < 0:
            raise UserError(f"setting '{key}' must not be negative, not {getattr(cfg, key)}.")
    if cfg.ramp_iters and cfg.ramp_iters >= cfg.max_iters:
        raise UserError(f"setting 'ramp_iters' ({cfg.ramp_iters}) must be below max_iters ({cfg.max_iters}); the "
                        f"lr would still be rising when the run ends.")
    if not 0 < cfg.lr_decay <= 1:
        raise UserError(f"setting 'lr_decay' is the factor the lr is multiplied by at each step, in (0, 1] "
                        f"(0.1 divides it by 10), not {cfg.lr_decay}.")
    if not 0 < cfg.warmup_until_train_err <= 1:
        raise UserError(f"setting 'warmup_until_train_err' is a training error in (0, 1] (0.8 is 80%), "
                        f"not {cfg.warmup_until_train_err}.")
    if cfg.plateau_patience < 1 or cfg.plateau_threshold < 0:
        raise UserError(f"settings 'plateau_patience' (at least 1 evaluation) and 'plateau_threshold' (not "
                        f"negative) cannot be {cfg.plateau_patience} and {cfg.plateau_threshold}.")
    if cfg.eval_view is not None:
        from ..data.views import VIEWS, canonical_view

        try:
            canonical_view(cfg.eval_view)
        except ValueError:
            raise UserError(f"setting 'eval_view' must be one of {', '.join(VIEWS)} (or null for the data's "
                            f"default), not '{cfg.eval_view}'{did_you_mean(cfg.eval_view, VIEWS)}.") from None
    if cfg.nesterov and cfg.momentum <= 0:
        raise UserError("setting 'nesterov' needs a positive momentum; set nesterov=false or momentum=0.9.")
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is not None and len(value) != cfg.in_chans:
            raise UserError(f"setting '{key}' needs one value per input channel ({cfg.in_chans}), not {value}.")
    # Pixels are in 0-1 units here; 0-255 values (123.675, 58.395: another common convention) would turn
    # every image into a near-constant input without any error.
    if cfg.mean is not None and not all(0 <= v <= 1 for v in cfg.mean):
        raise UserError(f"setting 'mean' is in 0-1 pixel units, not {cfg.mean}; divide 0-255 values by 255.")
    if cfg.std is not None and not all(0 < v <= 1 for v in cfg.std):
        raise UserError(f"setting 'std' is in 0-1 pixel units and positive, not {cfg.std}; divide 0-255 values "
                        f"by 255.")
    ms = list(cfg.milestones)
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise UserError(f"setting 'milestones' must be strictly increasing iteration counts of at least 1, "
                        f"not {cfg.milestones}.")
    if cfg.momentum >= 1:
        raise UserError(f"setting 'momentum' must be below 1 (the paper's is 0.9), not {cfg.momentum}.")
    for key in ("seed", "data_seed"):
        if not 0 <= getattr(cfg, key) < 2**63:
            raise UserError(f"setting '{key}' must be a whole number from 0 to 2**63-1, not {getattr(cfg, key)}.")
    for key in ("data", "arch", "recipe"):
        if not str(getattr(cfg, key)).strip():
            raise UserError(f"setting '{key}' is empty; give it a value or leave it out.")
    from ..models import resolve_options  # the model's settings, checked before any data is read

    resolve_options(cfg.arch, in_chans=cfg.in_chans, shortcut=cfg.shortcut, variant=cfg.variant,
                    zero_init_residual=cfg.zero_init_residual)


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of `cfg` with `changes` checked like overrides."""
    return dataclasses.replace(cfg, **{k: coerce(k, v) for k, v in changes.items()})
