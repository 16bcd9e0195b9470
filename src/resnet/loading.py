"""Load a trained model from any file a user has, without ever unpickling arbitrary objects.

Accepted: a run directory (`model.safetensors` + `model.json`, else `checkpoint.pt`), a `.safetensors`
file (with its `model.json` beside it, or metadata embedded by `resnet export`), a resumable training
checkpoint, or a torchvision/timm-layout ResNet state dict (`.pth`/`.pt`) for which the user names the
architecture. Pickle files go through `torch.load(weights_only=True)`, which refuses every global that is
not a tensor type; zip checkpoints are CRC-checked first so a flipped bit is caught, not silently loaded.

torchvision's and timm's bottleneck ResNets (50/101/152) put the down-sampling stride on the 3x3
convolution: load them with `variant="v1.5"`. The paper's layout (stride on the first 1x1) is "v1". The
weights alone cannot tell the two apart, so for bottleneck nets without metadata the variant must be named.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
import yaml
from torch import nn

from .artifacts import clean_state_dict, state_digest
from .errors import UserError, user_path
from .models import create_model, model_spec, resolve_options

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
META_KEY = "resnet"  # safetensors metadata entry holding model.json's content (written by `resnet export`)
DIGEST_KEY = "weights_sha256"
META_DIGEST_KEY = "resnet_sha256"  # sha256 of the META_KEY entry's text, so a flipped bit there is caught too
# Keys under which checkpoints commonly nest the weights, most specific first.
_NESTED = ("ema", "model", "state_dict", "model_state_dict", "model_state", "module", "net")


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"model file '{path}' is truncated or corrupt ({why}); copy it again or re-create it.")


# --- reading files -------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; one-sentence error when it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError, OSError, ValueError: all mean the bytes are not a valid file
        raise _corrupt(path, str(err).splitlines()[0][:120] if str(err) else type(err).__name__) from None
    return state, meta


def read_pickle(path: Path, map_location="cpu") -> object:
    """`torch.load(weights_only=True)` with the failure modes turned into one sentence each."""
    if path.suffix == ".onnx":
        raise _an_export(path, "an ONNX")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()  # CRC of every record: torch.load itself does not check them
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise _corrupt(path, str(err)[:120]) from None
        if bad is not None:
            raise _corrupt(path, f"checksum mismatch in '{bad}'")
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise _an_export(path, "a TorchScript")
    else:  # torch.save writes a zip, or (legacy format) a pickle, which starts with its protocol byte 0x80
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as err:
            raise UserError(f"cannot read model file '{path}' ({err.strerror or err}).") from None
        if head and not head.startswith((b"PK", b"\x80")):
            raise UserError(f"'{path}' is not a model file (neither PyTorch's format nor safetensors); pass a "
                            f"run directory, a model.safetensors or a .pt/.pth state dict.")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            with open(path, "rb") as f:  # a file object: torch.load would pick its reader by the name's suffix
                return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            names = pickle_globals(path)
        except Exception:  # noqa: BLE001 - the opcode stream itself is broken: a damaged file
            raise _corrupt(path, "its pickle data is malformed") from None
        culprit = f" ({', '.join(dict.fromkeys(names[:3]))})" if names else ""
        if not names:
            text = str(err)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            culprit = f" ({lines[-2][:80]})" if len(lines) >= 2 else ""
        raise UserError(f"refusing to load '{path}': it holds pickled Python objects, not just tensors"
                        f"{culprit}, and unpickling them could run arbitrary code; save a state_dict or "
                        f"use model.safetensors instead.") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as err:
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise _corrupt(path, first) from None


def _an_export(path: Path, kind: str) -> UserError:
    return UserError(f"'{path}' is {kind} export, for other runtimes; resnet eval and predict load the run "
                     f"directory or model.safetensors it was exported from.")


def pickle_globals(path: Path) -> list[str]:
    """Callables and classes a pickle file names, read off its opcodes without executing any of them
    (for zip checkpoints, from the archive's data.pkl). Raises when the opcode stream is malformed."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            data = zf.read(name)
    else:
        data = path.read_bytes()
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    allowed = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
    return [n for n in found if not n.startswith(allowed)]


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unnest(obj: object, path: Path, trained: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights inside a loaded pickle, plus what the file says about them (checkpoint config).
    A training checkpoint gives its averaged (EMA) weights when it has them, as the run saves them;
    `trained` asks for the trained weights ("model") instead."""
    if _is_state_dict(obj):
        return obj, {}
    if isinstance(obj, dict):
        info = {k: obj[k] for k in ("config", "model_meta") if isinstance(obj.get(k), dict)}
        # Ours (it records its config): a run folder's model.json describes it. A timm or torchvision training
        # checkpoint ({"state_dict": ..., "epoch": ...}) is another model, even inside a run folder.
        info["checkpoint"] = bool(info)
        if trained and _is_state_dict(obj.get("model")):
            return obj["model"], info
        for key in _NESTED:
            if _is_state_dict(obj.get(key)):
                return obj[key], info
    raise UserError(f"'{path}' holds no ResNet weights (expected a state dict or a checkpoint with a "
                    f"'model' entry); pass a run directory, model.safetensors or a state_dict file.")


# --- matching weights to a model -----------------------------------------------------------------------
def _shape(t: torch.Tensor | None) -> str:
    return "x".join(map(str, t.shape)) if t is not None and t.dim() else "scalar"


def _limit(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


_FIX_ARCH = "check the architecture (--arch) and its options"  # when weights do not fit (eval, predict, export)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str,
                     fix: str = _FIX_ARCH) -> None:
    """Raise one sentence naming the mismatched keys or class counts when `state` does not fit `model`."""
    want = model.state_dict()
    if "fc.weight" in state and "fc.weight" in want and state["fc.weight"].shape != want["fc.weight"].shape:
        got_n, exp_n = state["fc.weight"].shape[0], want["fc.weight"].shape[0]
        if got_n != exp_n and state["fc.weight"].shape[1:] == want["fc.weight"].shape[1:]:
            raise UserError(f"'{path}' has {got_n} output classes (fc.weight {_shape(state['fc.weight'])}) "
                            f"but the model expects {exp_n}; drop the num_classes option or fix model.json.")
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} ({_shape(state[k])} in the file, {_shape(want[k])} in {arch})"
             for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_limit(missing)}")
        if unexpected:
            parts.append(f"unexpected {_limit(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_limit(wrong, 3)}")
        raise UserError(f"the weights in '{path}' do not fit {arch}: {'; '.join(parts)}; {fix}.")


def _infer_options(arch: str, state: dict[str, torch.Tensor], given: dict) -> dict:
    """Options a bare state dict implies: class count, input channels and (residual nets) the shortcut."""
    spec = model_spec(arch)
    opts = dict(given)
    if "fc.weight" in state:
        opts.setdefault("num_classes", int(state["fc.weight"].shape[0]))
    if "conv1.weight" in state and state["conv1.weight"].dim() == 4:
        opts.setdefault("in_chans", int(state["conv1.weight"].shape[1]))
    if spec.residual and "shortcut" not in opts:
        n_blocks = sum(spec.layers)
        n_proj = sum(1 for k in state if k.endswith("downsample.0.weight"))
        opts["shortcut"] = "A" if n_proj == 0 else ("C" if n_proj == n_blocks else "B")
    if spec.block == "bottleneck" and "variant" not in opts:
        raise UserError(f"weights without metadata do not say where {arch}'s down-sampling stride sits: "
                        f"add --option variant=v1.5 for torchvision or timm weights (stride on the 3x3) or "
                        f"variant=v1 for the paper's layout (stride on the first 1x1).")
    return opts


def default_meta(arch: str, options: dict) -> dict:
    """What model.json would say, for weights that came without one (torchvision/timm or a checkpoint)."""
    spec = model_spec(arch)
    c = options["in_chans"]
    imagenet = spec.family == "imagenet"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (CIFAR10_MEAN, CIFAR10_STD)
    if c != 3:
        mean, std = [sum(mean) / 3] * c, [sum(std) / 3] * c
    return {"arch": arch, "options": options, "classes": [str(i) for i in range(options["num_classes"])],
            "mean": mean, "std": std, "input_size": [c, 224, 224] if imagenet else [c, 32, 32],
            "eval_view": "center" if imagenet else "full", "recipe": None, "metrics": {},
            "assumed": ["classes", "mean", "std", "input_size", "eval_view"]}


def _merge_options(meta_opts: dict, user_opts: dict, path: Path) -> dict:
    clash = [k for k, v in user_opts.items() if k in meta_opts and v is not None and meta_opts[k] != v]
    if clash:
        k = clash[0]
        raise UserError(f"option {k}={user_opts[k]!r} contradicts the {k}={meta_opts[k]!r} recorded with "
                        f"'{path}'; drop the option.")
    return {**meta_opts, **{k: v for k, v in user_opts.items() if v is not None}}


def _build(arch: str, options: dict, state: dict[str, torch.Tensor], path: Path, folded: bool,
           fix: str = _FIX_ARCH) -> nn.Module:
    model = create_model(arch, **options)
    if folded:
        from .inference import fold_bn

        model = fold_bn(model)
    check_state_dict(model, state, path, arch, fix)
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise _corrupt(path, "non-finite weights")
    model.load_state_dict(state, strict=False)  # strict up to num_batches_tracked, checked above
    return model.eval()


# --- the one entry point -------------------------------------------------------------------------------
def _locate(path: Path, checkpoint_first: bool = False) -> tuple[Path, Path | None]:
    """(weights file, model.json or None) for a run directory or a file; in a run directory the model
    (model.safetensors) comes before the checkpoint unless `checkpoint_first`."""
    if not path.exists():
        raise UserError(f"model '{path}' does not exist; pass a run directory (resnet train --out), a "
                        f"model.safetensors or a .pt/.pth file.")
    if path.is_dir():
        names = ("model.safetensors", "checkpoint.pt")
        # model.json is written after model.safetensors: a run stopped between the two (or a copy without it)
        # is described by its checkpoint, not by nothing.
        undescribed = not (path / "model.json").is_file() and (path / "checkpoint.pt").is_file()
        for name in reversed(names) if checkpoint_first or undescribed else names:
            if (path / name).is_file():
                sidecar = path / "model.json"
                return path / name, sidecar if sidecar.is_file() else None
        raise UserError(f"run directory '{path}' holds neither model.safetensors nor checkpoint.pt; train "
                        f"into it first or pass the model file itself.")
    if path.suffix == ".json":
        weights = path.with_suffix(".safetensors")
        if not weights.is_file():
            raise UserError(f"'{path}' describes a model but '{weights}' is missing beside it.")
        return weights, path
    sidecar = path.with_suffix(".json") if path.suffix == ".safetensors" else path.parent / "model.json"
    return path, sidecar if sidecar.is_file() else None


def _run_config(folder: Path) -> dict:
    """The training run's resolved config.yaml in `folder`, or {} when there is none readable."""
    try:
        doc = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _bad_meta(path: Path, key: str, wanted: str) -> UserError:
    return UserError(f"the model description of '{path}' has a bad '{key}' (it must be {wanted}); fix it in "
                     f"model.json, or re-create it.")


def _check_meta(meta: dict, path: Path) -> None:
    """The fields every command relies on, checked once, so a hand-edited model.json is one sentence instead
    of a traceback later (or, for a zero std, NaN scores)."""
    from .data.views import VIEWS, canonical_view

    c = meta["options"]["in_chans"]

    def numbers(v, n):
        return (isinstance(v, list) and len(v) == n
                and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v))

    # Statistics in 0-255 units (as mmcv and some papers write them: 123.675, ...) would score every image
    # as near-black noise; within 0-1 the pixels' mean is in [0, 1] and their std at most 1.
    if not numbers(meta["mean"], c) or not all(0 <= x <= 1 for x in meta["mean"]):
        raise _bad_meta(path, "mean", f"{c} numbers, one per input channel, in 0-1 pixel units")
    if not numbers(meta["std"], c) or not all(0 < x <= 1 for x in meta["std"]):
        raise _bad_meta(path, "std", f"{c} positive numbers, one per input channel, in 0-1 pixel units")
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)
            and size[0] == c):
        raise _bad_meta(path, "input_size", f"[channels, height, width] with {c} channels, as the model has")
    if not isinstance(meta["classes"], list) or not all(isinstance(x, str) for x in meta["classes"]):
        raise _bad_meta(path, "classes", "a list of class names")
    if len(set(meta["classes"])) != len(meta["classes"]):  # eval maps by name: a repeated one loses a class
        raise _bad_meta(path, "classes", "a list of distinct class names")
    try:
        canonical_view(meta["eval_view"])
    except (ValueError, TypeError):
        raise _bad_meta(path, "eval_view", f"one of {', '.join(VIEWS)}") from None
    assumed = meta.get("assumed", [])
    if not (isinstance(assumed, list) and all(isinstance(x, str) for x in assumed)):
        raise _bad_meta(path, "assumed", "a list of the field names that were guessed")
    for key in ("data", "data_dir"):
        if key in meta and not isinstance(meta[key], str):
            raise _bad_meta(path, key, "a data source name or folder path")
    split = meta.get("val_split")
    if split is not None and not (isinstance(split, dict) and isinstance(split.get("val_size"), int | float)
                                  and isinstance(split.get("seed", 0), int)):
        raise _bad_meta(path, "val_split", 'a mapping {"val_size": N, "seed": S}')


def _is_safetensors(path: Path) -> bool:
    """True when `path` holds safetensors bytes (an 8-byte header length, then a JSON header), whatever its
    name: a state dict saved with torch.save and named *.safetensors, or a safetensors file named *.pth,
    is read by what it holds, not by its suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return path.suffix == ".safetensors"
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= size:
        return True  # (a zip's 9th byte is its compression method, a pickle's an opcode argument: never "{")
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip or legacy pickle
        return False
    return path.suffix == ".safetensors"  # empty or damaged: reported by the reader its name asks for


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"model description '{path}' is not valid JSON ({err}); re-create it.") from None
    if not isinstance(doc, dict) or "arch" not in doc:
        raise UserError(f"'{path}' is not a resnet model.json (no 'arch'); re-create it.")
    return doc


def load_model(path: str | Path, *, arch: str | None = None, options: dict | None = None,
               map_location: str | torch.device = "cpu", trained: bool = False,
               bare_only: bool = False) -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata as in model.json) from a run dir, safetensors, checkpoint or state dict.

    `arch` and `options` are needed only for files that do not describe themselves (torchvision/timm state
    dicts); when given for one that does, they must agree with it, unless `bare_only`: then they describe
    only a bare state dict, and a file that describes itself is loaded as it says (the caller compares).
    meta["source"] is the weights file, meta["bn_folded"] tells whether the model came with BatchNorm
    already folded (from `resnet export`).
    """
    path = user_path(path)  # "--model=~/runs/x" reaches us unexpanded by the shell
    user_opts = dict(options or {})
    weights, sidecar = _locate(path, checkpoint_first=trained)  # a run's model.safetensors holds the average
    is_st = _is_safetensors(weights)
    if trained and is_st:
        raise UserError(f"'{weights}' holds one set of weights; --trained-weights needs a training run's "
                        f"checkpoint.pt (or its run directory).")
    meta: dict | None = None
    cfg: dict = {}
    if is_st:
        state, header = read_safetensors(weights)
        if META_KEY in header:
            recorded = header.get(META_DIGEST_KEY)  # exports before 2026-11-25 carry none
            if recorded and hashlib.sha256(header[META_KEY].encode()).hexdigest() != recorded:
                raise _corrupt(weights, "its embedded metadata does not match the recorded checksum")
            try:
                meta = json.loads(header[META_KEY])
            except json.JSONDecodeError:
                raise _corrupt(weights, "its embedded metadata is not JSON") from None
        elif sidecar is not None:
            meta = _read_json(sidecar)
    else:
        state, info = _unnest(read_pickle(weights), weights, trained)
        cfg = info.get("config") or {}
        if sidecar is not None and info.get("checkpoint"):  # a bare state dict (a downloaded .pth) in a run
            meta = _read_json(sidecar)                       # folder is another model: not described by it
            own = info.get("model_meta") or {}  # the checkpoint's own description: the model.json beside it
            differ = [k for k in ("arch", "classes", "mean", "std", "input_size")  # must be of the same run
                      if k in own and k in meta and json.loads(json.dumps(own[k])) != meta[k]]
            if differ:
                raise UserError(f"'{sidecar}' describes another model than '{weights}' (their {differ[0]} "
                                f"differ); keep each checkpoint in its own run directory, or remove the "
                                f"model.json beside it (the checkpoint describes itself).")
        elif info.get("model_meta"):  # a run that has not finished: its checkpoint describes the model
            meta = dict(info["model_meta"])
    if bare_only and (meta is not None or cfg.get("arch")):  # the file says what it holds: the caller's
        arch, user_opts = None, {}                            # arch and options were for a bare state dict
    if meta is None and cfg.get("arch"):  # an older checkpoint without its model.json: options from config
        arch_opts = {k: cfg.get(k) for k in ("in_chans", "shortcut", "variant", "zero_init_residual")}
        user_opts = _merge_options({k: v for k, v in arch_opts.items() if v is not None}, user_opts, weights)
        arch = arch or cfg["arch"]
    state = clean_state_dict(state)
    if meta is not None and not (isinstance(meta, dict) and isinstance(meta.get("arch"), str)):
        raise _bad_meta(weights, "arch", "the network's name, e.g. resnet20; 'resnet models' lists them")
    if meta is not None:
        if arch is not None and arch != meta["arch"]:
            raise UserError(f"--arch {arch} contradicts the architecture {meta['arch']} recorded with "
                            f"'{weights}'; drop --arch.")
        arch = meta["arch"]
        if not isinstance(meta.get("options") or {}, dict):
            raise _bad_meta(weights, "options", "a mapping of create_model options")
        opts = resolve_options(arch, **_merge_options(dict(meta.get("options") or {}), user_opts, weights))
        base = default_meta(arch, opts)
        meta = {k: v for k, v in meta.items() if v is not None or k not in base}  # null: the default
        assumed = [k for k in base.pop("assumed") if k not in meta]
        meta = {**base, **meta, "options": opts, **({"assumed": assumed} if assumed else {})}
        _check_meta(meta, weights)
    else:
        if arch is None:
            raise UserError(f"'{weights}' does not say which network it holds; name it with --arch (e.g. "
                            f"--arch resnet50 --option variant=v1.5 for torchvision weights).")
        opts = resolve_options(arch, **_infer_options(arch, state, user_opts))
        meta = default_meta(arch, opts)
        if bare_only:  # the options not read from the keys (a bottleneck's variant) are the caller's
            meta["assumed"].append("options")
    classes = meta.get("classes") or []
    if len(classes) != opts["num_classes"]:
        raise UserError(f"'{weights}' lists {len(classes)} class names but the model has "
                        f"{opts['num_classes']} outputs; fix the classes in model.json.")
    fix = ("set arch and its options (arch=, shortcut=, variant=) to the network the weights are for" if bare_only
           else _FIX_ARCH)
    # The network first: weights of another model than model.json describes fail here, by their keys and
    # shapes, rather than as a corrupt file below.
    model = _build(arch, opts, state, weights, folded=bool(meta.get("bn_folded")), fix=fix)
    if is_st:
        expected = meta.get(DIGEST_KEY) or header.get(DIGEST_KEY)  # model.json's, or the file's own
        if expected and state_digest(state) != expected:
            raise _corrupt(weights, "its weights do not match the recorded checksum")
    else:  # the digest describes model.safetensors; a checkpoint beside that model.json holds other weights
        meta.pop(DIGEST_KEY, None)
    meta["source"] = str(weights)
    meta.setdefault("bn_folded", False)
    if "data" not in meta or "val_split" not in meta:  # runs older than these records: their config says them
        run_cfg = cfg or (_run_config(weights.parent) if sidecar is not None else {})
        if "data" not in meta and run_cfg.get("data"):
            meta["data"] = str(run_cfg["data"])
            if run_cfg.get("data_dir"):
                meta["data_dir"] = str(run_cfg["data_dir"])
        if "val_split" not in meta and run_cfg.get("val_size"):
            meta["val_split"] = {"val_size": run_cfg["val_size"], "seed": int(run_cfg.get("data_seed") or 0)}
    return model.to(map_location), meta


# --- shared command-line arguments ---------------------------------------------------------------------
_INT = re.compile(r"-?[0-9]+")  # ASCII digits only: "²" and "--5" stay strings (and are refused by name later)


def parse_options(pairs: list[str] | None) -> dict:
    """`["variant=v1.5", "num_classes=10"]` -> {"variant": "v1.5", "num_classes": 10} (ints and bools typed)."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option takes KEY=VALUE (e.g. variant=v1.5), not '{pair}'.")
        key, value = key.strip(), value.strip()
        low = value.lower()
        out[key] = (int(value) if _INT.fullmatch(value) else
                    low == "true" if low in ("true", "false") else
                    value.upper() if key == "shortcut" else value)  # shortcut=a is option A
    return out


def add_model_arguments(parser) -> None:
    """MODEL plus --arch/--option, shared by eval, predict and export."""
    parser.add_argument("model", metavar="MODEL",
                        help="run directory, model.safetensors, checkpoint.pt, or a torchvision/timm .pth")
    parser.add_argument("--arch", default=None,
                        help="architecture of a state dict without metadata (e.g. resnet50)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option for such a state dict, e.g. variant=v1.5 for torchvision "
                             "bottleneck weights (repeatable)")
    parser.add_argument("--trained-weights", action="store_true", dest="trained_weights",
                        help="from a checkpoint.pt whose run averaged its weights (ema_decay > 0), load the "
                             "trained weights instead of the average")


def load_from_args(args, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    model, meta = load_model(args.model, arch=args.arch, options=parse_options(args.option),
                             map_location=map_location, trained=getattr(args, "trained_weights", False))
    assumed = meta.get("assumed") or []
    if {"mean", "std", "input_size"} & set(assumed):  # scores would silently depend on a guess: say it, once
        import sys

        print(f"note: '{meta['source']}' does not record {', '.join(assumed)}; assuming the "
              f"{model_spec(meta['arch']).family} defaults (mean {[round(v, 4) for v in meta['mean']]}, input "
              f"{'x'.join(map(str, meta['input_size'][1:]))}, classes 0..{len(meta['classes']) - 1}, view "
              f"{meta['eval_view']}).", file=sys.stderr)
    return model, meta
