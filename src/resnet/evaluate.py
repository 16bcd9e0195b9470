"""Top-1/top-5 error of a trained model on a data split, with classes matched by name.

The model's class list (saved with it) and the data's class list (sorted folder names) need not be in the
same order, nor the same length: every data class must exist in the model, and each label is mapped to the
model's index of that name before scoring. Under torchrun each rank scores a disjoint shard and the sums
(a confusion matrix and the top-5 hits) are all-reduced, so each sample counts exactly once.
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import UserError


def class_mapping(model_classes: list[str], data_classes: list[str]) -> torch.Tensor:
    """Tensor m with m[data_index] = model_index of the same class name; one sentence when one is missing."""
    def key(name: str) -> str:  # a folder copied from macOS may spell "é" decomposed (NFD): the same name
        return unicodedata.normalize("NFC", name)

    index = {key(name): i for i, name in enumerate(model_classes)}
    missing = [c for c in data_classes if key(c) not in index]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"the data has classes the model was not trained on ({shown}); evaluate on data whose "
                        f"class folders are among the model's {len(model_classes)} classes.")
    return torch.tensor([index[key(c)] for c in data_classes], dtype=torch.long)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """CPU tensor `t` summed element-wise over the torch.distributed ranks (itself outside them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    t = t.cuda() if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(t)
    return t.cpu()


class Scorer:
    """Running sums for top-1/top-5 error: a confusion matrix (true x predicted, model indices) and top-5 hits."""

    def __init__(self, num_classes: int, topk: int = 5):
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.topk = min(topk, num_classes)
        self.top5_hits = torch.zeros((), dtype=torch.long)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.detach().float().cpu(), target.cpu()
        top = logits.topk(self.topk, dim=1).indices
        self.top5_hits += (top == target[:, None]).any(dim=1).sum()
        flat = target * self.confusion.shape[0] + top[:, 0]
        self.confusion += torch.bincount(flat, minlength=self.confusion.numel()).view_as(self.confusion)

    def all_reduce(self) -> None:
        """Sum over ranks (a no-op outside torch.distributed)."""
        flat = sum_over_ranks(torch.cat([self.confusion.flatten(), self.top5_hits.view(1)]))
        self.confusion = flat[:-1].view_as(self.confusion).clone()
        self.top5_hits = flat[-1].clone()

    def result(self, classes: list[str], data_classes: list[str] | None = None, per_class: bool = False) -> dict:
        n = int(self.confusion.sum())
        if n == 0:
            raise UserError("the evaluated split holds no images; check --data and --split.")
        top1_hits = int(self.confusion.diagonal().sum())
        out = {"n": n, "top1_err": 1.0 - top1_hits / n, "top5_err": 1.0 - int(self.top5_hits) / n,
               "top5_k": self.topk}
        if per_class:
            rows = []
            present = set(data_classes) if data_classes is not None else None
            for i, name in enumerate(classes):
                count = int(self.confusion[i].sum())
                if count or (present is not None and name in present):
                    err = 1.0 - int(self.confusion[i, i]) / count if count else None
                    rows.append({"class": name, "n": count, "top1_err": err})
            out["per_class"] = rows
        return out


def score(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, mapping: torch.Tensor,
          num_classes: int) -> Scorer:
    """Run `predict` over (x, y) batches (x a tensor or a multi-view batch), labels mapped to model indices."""
    from .data.views import view_logits

    scorer = Scorer(num_classes)
    for x, y in batches:
        scorer.update(view_logits(predict, x), mapping[y.cpu()])
    scorer.all_reduce()
    return scorer


def _dist_info() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment if not yet joined."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():  # one small all-reduce of counts on the CPU: gloo, whatever the device
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def view_config(meta: dict):
    """The views' sizes scaled to the model's input size: the paper's 224 crop of a 256 image (and scales
    224..640) for ImageNet models, the same ratios for any other size (a 32-pixel model gets 37 -> 32)."""
    from .data.augment import AugmentConfig

    crop = int(min(meta["input_size"][1:]))
    base = AugmentConfig()
    ratio = crop / base.crop
    return AugmentConfig(crop=crop, resize=round(base.resize * ratio),
                         scales=tuple(round(s * ratio) for s in base.scales))


def _full_view_side(view: str, split, meta: dict) -> int | None:
    """The side to bring images to for the full and flip views ("the image as it is") when the data's images
    are not the model's input size: the shorter side resized to it and the centre taken, as `resnet predict`
    does (resnet.predict.prepare). None when nothing is resized."""
    size = getattr(split, "image_size", None)
    h, w = (int(v) for v in meta["input_size"][1:])
    if view not in ("full", "flip") or size is None or tuple(size) == (h, w):
        return None
    return min(h, w)


def _center(x, side: int, view: str):
    """A batch of the full view brought to `side` x `side`, then given `view` (flip: cropped, then mirrored,
    in the order resnet.predict.prepare takes)."""
    from .data.views import center_view, make_views

    return make_views(center_view(x, side, side), view)


def _check_recorded_carve(recorded: dict, ds, data) -> None:
    """Refuse the run's own val carve on a folder whose files changed since training: the same size and seed
    would pick other images, some of which the model was trained on."""
    from .data.dataset import split_digest

    digest = split_digest(ds.splits["val"])
    if recorded.get("digest") and digest is not None and digest != recorded["digest"]:
        now = len(ds.splits["val"]) + len(ds.splits["train"])
        raise UserError(f"the images of '{data}' changed since the model's run carved its validation split from "
                        f"them ({recorded.get('images', '?')} images then, {now} now), so the same seed now picks "
                        f"other images, some of which it was trained on; restore the folder as it was to score "
                        f"the run's validation images.")


def evaluate(model: torch.nn.Module, meta: dict, data: str, *, split: str | None = None,
             view: str | None = None, batch_size: int = 128, data_dir: str | None = None,
             cache_dir: str | None = None, per_class: bool = False, backend: str = "auto",
             device: str = "cpu", predictor=None, val_size: float | None = None,
             data_seed: int | None = None, precision: str = "fp32", calibration_size: int | None = None,
             weight_bits: int | None = None) -> dict:
    """Score `model` (as loaded by `resnet.loading.load_model`) on `split` of `data`.

    Normalisation is the model's own (meta mean/std), not the data's; `view` defaults to the model's
    eval_view. Returns {"n", "top1_err", "top5_err", "split", "view", ...} on every rank.

    split="val" on data without a val split scores the images a training run carved out of train:
    `val_size`/`data_seed` when given, else the model's recorded meta["val_split"] (the same seeded carve,
    so the same images); the result then says what it carved in "val_carved".

    precision="bf16" runs the model in bfloat16 (see InferenceModel). precision="int8" quantizes the model with
    activation ranges measured on `calibration_size` images of the data's train split (never the scored images,
    unless the scored split is train or the only one), its weights of `weight_bits` bits (default: this CPU's,
    see resnet/quantize.py); the result says which in "calibration".
    """
    from .data import load_dataset, make_loader
    from .data.dataset import carve_val
    from .data.views import canonical_view
    from .inference import InferenceModel

    view = view or meta.get("eval_view") or "center"
    try:
        view = canonical_view(view)
    except ValueError as err:
        raise UserError(f"{err}.") from None
    in_chans = int(meta["options"]["in_chans"])
    ds = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir, in_chans=in_chans)
    carved = None
    recorded = meta.get("val_split") or {}
    if split is None:  # test, else val, else the val split the model's training carved out of train
        split = next((s for s in ("test", "val") if s in ds.splits), None)
        if split is None and "train" in ds.splits and (val_size or recorded.get("val_size")):
            split = "val"
        if split is None:
            raise UserError(f"'{data}' has no test or val split (it has {', '.join(ds.splits)}); pass --split "
                            f"{next(iter(ds.splits))}, or --split val --val-size N to score images carved out of "
                            f"train.")
    if split == "val" and "val" not in ds.splits and "train" in ds.splits:
        size = val_size if val_size is not None else recorded.get("val_size")
        if size:
            size = int(size) if float(size).is_integer() else float(size)
            seed = int(data_seed if data_seed is not None else recorded.get("seed", 0))
            if val_size is None and isinstance(size, int) and size >= len(ds.splits["train"]):
                raise UserError(f"the model's run carved {size} validation images out of its train split, but "
                                f"'{data}' has {len(ds.splits['train'])} in train; pass --val-size N to carve "
                                f"another number (these are then not the images the run validated on).")
            carve_val(ds.splits, size, seed)  # the carve load_dataset(val_size=, seed=) makes, without reloading
            carved = {"val_size": size, "seed": seed}
            if val_size is None and data_seed is None:
                _check_recorded_carve(recorded, ds, data)
    if split not in ds.splits:
        hint = (" (or pass --val-size N to score a val split carved out of train, as training does)"
                if split == "val" and "train" in ds.splits else "")
        raise UserError(f"'{data}' has no '{split}' split; choose one of {', '.join(ds.splits)}{hint}.")
    classes = list(meta["classes"])
    if "classes" in (meta.get("assumed") or []):  # a bare state dict (torchvision, timm): outputs, no names
        if len(ds.classes) != len(classes):
            raise UserError(f"'{meta.get('source')}' records no class names and has {len(classes)} outputs, but "
                            f"'{data}' has {len(ds.classes)} classes; evaluate it on data with {len(classes)} "
                            f"classes.")
        import sys

        # Output i is the data's i-th class, in its own order (sorted folder names: the order torchvision's
        # ImageNet weights use, the wnids n01440764, n01443537, ...).
        print(f"note: '{meta.get('source')}' records no class names; its {len(classes)} outputs are taken as "
              f"the data's classes in order ({', '.join(map(repr, ds.classes[:2]))}, ...).", file=sys.stderr)
        classes = meta["classes"] = list(ds.classes)
    mapping = class_mapping(classes, list(ds.classes))
    rank, world = _dist_info()
    side = _full_view_side(view, ds.splits[split], meta)
    loader = make_loader(ds.splits[split], batch_size, train=False, augment="none", mean=meta["mean"],
                         std=meta["std"], rank=rank, world_size=world, device=str(device),
                         channels_last=True, eval_view="full" if side else view, cfg=view_config(meta))
    calibration = batches = None
    if predictor is None and precision == "int8":
        from .quantize import CALIBRATION_SIZE, calibration_batches, calibration_split

        source = calibration_split(ds.splits, split)
        batches = calibration_batches(ds.splits[source], meta, size=calibration_size or CALIBRATION_SIZE)
    predictor = predictor or InferenceModel(model, meta, backend=backend, device=device, precision=precision,
                                            calibration=batches, weight_bits=weight_bits)
    if batches is not None:
        calibration = {"split": source, "n": sum(len(b) for b in batches), "weight_bits": predictor.weight_bits}
    stream = loader.iter_epoch(0)
    if side:
        if rank == 0:
            import sys

            h, w = ds.splits[split].image_size
            print(f"note: the images of '{data}' are {h}x{w} and the model's input is {side}x{side}; the {view} view "
                  f"resizes their shorter side to {side} and takes the centre, as resnet predict does.",
                  file=sys.stderr)
        stream = ((_center(x, side, view), y) for x, y in stream)
    start = time.perf_counter()
    scorer = score(predictor, stream, mapping, len(classes))
    wall = time.perf_counter() - start
    out = scorer.result(classes, list(ds.classes), per_class=per_class)
    if carved:
        out["val_carved"] = carved
    out["precision"] = getattr(predictor, "precision", "fp32")
    if calibration:
        out["calibration"] = calibration
    # Unreadable images of this split: found by the scan, plus those a streamed loader met (on any rank).
    met = sum_over_ranks(torch.tensor([len(getattr(loader, "skipped", []))]))
    skipped = len(getattr(ds.splits[split], "skipped", []) or []) + int(met.item())
    if side:
        out["resized_to"] = side
    out.update({"model": meta.get("source"), "data": str(data), "split": split, "view": view,
                "world_size": world, "skipped": skipped,
                "images_per_s": round(out["n"] / wall, 1) if wall > 0 else None})
    out["_confusion"] = scorer.confusion
    return out


def save_confusion_png(confusion: torch.Tensor, classes: list[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--confusion needs matplotlib; install it with: pip install 'resnet[demo]'.") from None
    keep = (confusion.sum(1) > 0) | (confusion.sum(0) > 0)
    idx = keep.nonzero().flatten()
    cm = confusion[idx][:, idx].double()
    cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    names = [classes[i] for i in idx.tolist()]
    size = max(4.0, min(20.0, 0.35 * len(names) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 50:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, format="png")
    except OSError as err:
        raise UserError(f"cannot write the confusion matrix to '{path}' ({err.strerror or err}); choose another "
                        f"--confusion path.") from None
    finally:
        plt.close(fig)
