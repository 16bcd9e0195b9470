"""`load_dataset`: any data argument (cifar10, cifar100, digits, a folder) as one `Dataset` of splits.

Memory splits hold uint8 N x C x H x W images (possibly memory-mapped from the cache); stream splits hold
file paths for data that does not fit in memory or whose images differ in size.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, did_you_mean, user_path
from . import cache as cache_mod
from .decode import MAX_PIXELS, BadImage, decode_image, image_size, to_gray
from .folder import scan_folder
from .sources import CIFAR, default_cache_dir, load_cifar, load_digits_set

NAMED_SOURCES = ("cifar10", "cifar100", "digits")
MEMORY_LIMIT = 4 << 30  # bytes of uint8 pixels up to which a folder of equal-size images is held in memory
PROBE_FILES = 64  # image headers read to decide between the memory and the streaming path
MIN_STD = 1 / 255  # a constant channel is divided by one grey level, not by zero
UNIFORM_SHARE = 0.95  # share of probed images that must have the most common size for the memory path
WARN_LIMIT = 20  # skipped files named one by one in warnings; the rest are counted


class SkippedImageWarning(UserWarning):
    """A file was left out because it could not be decoded (see `Dataset.skipped`)."""


class MemorySplit:
    """A split held as uint8 images: `images` N x C x H x W, `labels` int64 N.

    Internally a base array plus an optional index (a carved split shares its parent's memory-mapped
    array instead of copying it); `gather(i)` reads a batch without materialising `images`.
    """

    kind = "memory"

    def __init__(
        self,
        name: str,
        base: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor | None = None,
        paths: list[str] | None = None,
        skipped: list[tuple[str, str]] | None = None,
    ):
        self.name, self._base, self._index = name, base, index
        self.labels = labels
        self.paths = paths
        self.skipped = list(skipped or [])
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> torch.Tensor:
        if self._index is None:
            return self._base
        if self._images is None:
            self._images = self._base[self._index]
        return self._images

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self._base.shape[-2:])

    @property
    def in_chans(self) -> int:
        return self._base.shape[1]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images of the samples `idx` (positions in this split)."""
        return self._base[idx if self._index is None else self._index[idx]]

    def subset(self, name: str, idx: np.ndarray) -> MemorySplit:
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        base_idx = idx_t if self._index is None else self._index[idx_t]
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        return MemorySplit(name, self._base, self.labels[idx_t], base_idx, paths, [])


class StreamSplit:
    """A split read from files as it is used: `paths`, `labels` int64 N, `sizes` (H, W) per image."""

    kind = "stream"

    def __init__(
        self,
        name: str,
        paths: list[str],
        labels: torch.Tensor,
        sizes: list[tuple[int, int]],
        in_chans: int,
        max_pixels: int = MAX_PIXELS,
        skipped: list[tuple[str, str]] | None = None,
    ):
        self.name, self.paths, self.labels, self.sizes = name, paths, labels, sizes
        self.in_chans, self.max_pixels = in_chans, max_pixels
        self.skipped = list(skipped or [])

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.sizes[0] if self.sizes and all(s == self.sizes[0] for s in self.sizes) else None

    def subset(self, name: str, idx: np.ndarray) -> StreamSplit:
        return StreamSplit(
            name,
            [self.paths[i] for i in idx],
            self.labels[torch.as_tensor(idx)],
            [self.sizes[i] for i in idx],
            self.in_chans,
            self.max_pixels,
        )


Split = MemorySplit | StreamSplit


@dataclass
class Dataset:
    """A data source as the trainer sees it (see docs/contracts.md, "Data")."""

    name: str
    classes: list[str]
    kind: str  # "memory" | "stream"
    splits: dict[str, Split]
    in_chans: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""  # what was asked for: a named set or the folder's path

    @property
    def image_size(self) -> tuple[int, int] | None:
        sizes = {s.image_size for s in self.splits.values()}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------- statistics
def _memory_stats(split: MemorySplit, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in 0-1 units, exact, from a 256-bin histogram per channel."""
    c = split.in_chans
    hist = np.zeros((c, 256), dtype=np.int64)
    n = len(split)
    for s in range(0, n, chunk):
        batch = split.gather(torch.arange(s, min(n, s + chunk))).numpy()
        for ch in range(c):
            hist[ch] += np.bincount(batch[:, ch].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum(1)
    mean = (hist * values).sum(1) / total
    var = (hist * values**2).sum(1) / total - mean**2
    return [float(m) for m in mean], [max(float(max(v, 0.0) ** 0.5), MIN_STD) for v in var]


def _stream_stats(split: StreamSplit, sample: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std from an even sample of training images, decoded at about 1/4 scale."""
    n = len(split)
    picks = np.unique(np.linspace(0, n - 1, num=min(sample, n)).round().astype(int))
    s1 = np.zeros(split.in_chans)
    s2 = np.zeros(split.in_chans)
    count = 0
    for i in picks:
        h, w = split.sizes[i]
        try:
            arr = decode_image(
                split.paths[i],
                split.in_chans,
                max_pixels=split.max_pixels,
                draft_size=(max(1, w // 4), max(1, h // 4)),
            )
        except BadImage:
            continue
        x = arr.reshape(split.in_chans, -1).astype(np.float64) / 255.0
        s1 += x.sum(1)
        s2 += (x**2).sum(1)
        count += x.shape[1]
    if count == 0:
        return [0.5] * split.in_chans, [0.25] * split.in_chans
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    return [float(m) for m in mean], [max(float(s), MIN_STD) for s in std]


# ------------------------------------------------------------------------------------------ helpers
def _report_skips(skipped: list[tuple[str, str]], strict: bool) -> None:
    if not skipped:
        return
    if strict:
        path, reason = skipped[0]
        raise UserError(f"{path} {reason}; fix or remove it, or run without --strict to skip bad files.")
    for path, reason in skipped[:WARN_LIMIT]:
        warnings.warn(f"skipped {path}: it {reason}", SkippedImageWarning, stacklevel=3)
    if len(skipped) > WARN_LIMIT:
        warnings.warn(
            f"skipped {len(skipped) - WARN_LIMIT} more bad files (see Dataset.skipped)",
            SkippedImageWarning,
            stacklevel=3,
        )


def carve_val(splits: dict, val_size: int | float | None, seed: int) -> None:
    """Move a seeded random `val_size` (count or fraction) of train into a new "val" split (in place; the
    same `splits`, size and seed always give the same images)."""
    if val_size is None or val_size == 0:
        return
    if "val" in splits:
        warnings.warn("the source has its own val split; val_size is ignored", UserWarning, stacklevel=3)
        return
    if "train" not in splits:
        raise UserError("val_size needs a train split to carve the validation images from.")
    train = splits["train"]
    n = len(train)
    if isinstance(val_size, float) and 0 < val_size < 1:
        count = int(round(n * val_size))
    elif isinstance(val_size, float) and not val_size.is_integer() or val_size < 0:
        raise UserError(f"val_size {val_size} must be a count of images or a fraction between 0 and 1.")
    else:
        count = int(val_size)
    if count <= 0:
        raise UserError(f"val_size {val_size} holds out no images of the {n} in train; choose more.")
    if count >= n:
        raise UserError(f"val_size {val_size} leaves no training images ({n} in train); choose fewer.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"the seed of the validation carve must be a whole number from 0 to 2**63-1, not {seed}; "
                        f"pass --seed/--data-seed 0 (or the training run's data_seed).")
    order = np.random.default_rng(seed).permutation(n)
    splits["val"] = train.subset("val", np.sort(order[:count]))
    splits["train"] = train.subset("train", np.sort(order[count:]))


def split_digest(split) -> str | None:
    """A short fingerprint of which files a split holds and their labels (each file by its class folder and
    name, so a moved data folder keeps its digest); None for a split of a named source, which is fixed."""
    paths = getattr(split, "paths", None)
    if paths is None:
        return None
    h = hashlib.sha256()
    for path, label in zip(paths, split.labels.tolist(), strict=True):
        name = f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
        h.update(f"{name}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _memory_split(name: str, images: np.ndarray, labels: np.ndarray, in_chans: int) -> MemorySplit:
    if images.shape[1] == 3 and in_chans == 1:
        images = to_gray(images)
    elif images.shape[1] == 1 and in_chans == 3:
        images = np.repeat(images, 3, axis=1)
    return MemorySplit(name, torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


# ------------------------------------------------------------------------------------------- sources
def _load_named(name: str, data_dir, in_chans: int) -> tuple[list[str], dict]:
    classes, raw = load_cifar(name, data_dir) if name in CIFAR else load_digits_set()
    return classes, {s: _memory_split(s, im, lab, in_chans) for s, (im, lab) in raw.items()}


def _probe_sizes(paths: list[str], max_pixels: int) -> Counter:
    """How often each (H, W) occurs among the headers of an even sample of `paths`."""
    n = len(paths)
    sizes: Counter = Counter()
    for i in np.unique(np.linspace(0, n - 1, num=min(PROBE_FILES, n)).round().astype(int)):
        try:
            sizes[image_size(paths[i], max_pixels)] += 1
        except BadImage:
            pass
    return sizes


def _in_cache(build, *args, **kwargs):
    """`build(...)` with a cache folder that cannot be written (read-only, full, not a folder) as one sentence."""
    try:
        return build(*args, **kwargs)
    except OSError as err:
        raise UserError(f"cannot write the decode cache in {kwargs['cache_dir']} ({err.strerror or err}); choose "
                        f"another folder with --cache-dir or RESNET_CACHE_DIR.") from None


def _load_folder(
    root: str,
    *,
    cache_dir: Path,
    in_chans: int,
    kind: str | None,
    max_pixels: int,
    workers: int | None,
    memory_limit: int,
) -> tuple[list[str], dict, str]:
    classes, scanned = scan_folder(root)
    first = scanned.get("train") or next(iter(scanned.values()))
    sizes = _probe_sizes(first.paths, max_pixels)
    total = sum(len(s.paths) for s in scanned.values())
    size, count = sizes.most_common(1)[0] if sizes else ((0, 0), 0)
    if kind is None:
        # Memory when (nearly) all images share one size and fit; the rare odd one is resized to it.
        uniform = count >= UNIFORM_SHARE * sum(sizes.values())
        fits = total * in_chans * size[0] * size[1] <= memory_limit
        kind = "memory" if sizes and uniform and fits else "stream"
    if kind == "memory" and not sizes:
        kind = "stream"  # not one probed header was readable; the streaming index will say why
    splits = {}
    for name, sc in scanned.items():
        if kind == "memory":
            fp = sc.fingerprint("memory", in_chans, size, max_pixels, cache_mod.DECODE_VERSION, classes)
            arr, meta = _in_cache(
                cache_mod.build_or_load_memory,
                sc.paths,
                root=root,
                split=name,
                fingerprint=fp,
                cache_dir=cache_dir,
                in_chans=in_chans,
                size=size,
                max_pixels=max_pixels,
                workers=workers,
            )
            bad = {i: reason for i, reason in meta["bad"]}
            keep = torch.tensor([i for i in range(len(sc.paths)) if i not in bad], dtype=torch.int64)
            labels = torch.tensor(sc.labels, dtype=torch.int64)[keep]
            split = MemorySplit(
                name,
                torch.from_numpy(arr),
                labels,
                keep if bad else None,
                [sc.paths[i] for i in keep.tolist()],
                [(sc.paths[i], r) for i, r in bad.items()],
            )
        else:
            fp = sc.fingerprint("stream", in_chans, max_pixels, cache_mod.DECODE_VERSION, classes)
            meta = _in_cache(
                cache_mod.build_or_load_index,
                sc.paths,
                root=root,
                split=name,
                fingerprint=fp,
                cache_dir=cache_dir,
                in_chans=in_chans,
                max_pixels=max_pixels,
                workers=workers,
            )
            bad = {i: reason for i, reason in meta["bad"]}
            keep = [i for i in range(len(sc.paths)) if i not in bad]
            split = StreamSplit(
                name,
                [sc.paths[i] for i in keep],
                torch.tensor([sc.labels[i] for i in keep], dtype=torch.int64),
                [tuple(meta["sizes"][i]) for i in keep],
                in_chans,
                max_pixels,
                [(sc.paths[i], r) for i, r in bad.items()],
            )
        splits[name] = split
        # An empty class folder is refused by the scan; one whose every image was skipped is just as empty.
        usable = set(split.labels.tolist())
        for cls in sc.class_names:
            label = classes.index(cls)
            if label not in usable:
                label_of = dict(zip(sc.paths, sc.labels, strict=True))
                bad = [(p, r) for p, r in split.skipped if label_of[p] == label]
                raise UserError(f"the class folder {Path(root) / name / cls} has no usable images: all {len(bad)} "
                                f"were skipped ({os.path.basename(bad[0][0])} {bad[0][1]}); fix or replace them, or "
                                f"remove the folder.")
    return classes, splits, kind


def load_dataset(
    data: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    in_chans: int = 3,
    val_size: int | float | None = None,
    seed: int = 0,
    strict: bool = False,
    kind: str | None = None,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    memory_limit: int = MEMORY_LIMIT,
) -> Dataset:
    """Load a data source: "cifar10", "cifar100", "digits" or an ImageFolder directory.

    `val_size` (a count, or a fraction < 1) carves a seeded validation split out of train when the source
    has none. Bad files are skipped with a warning and listed in `Dataset.skipped`; `strict` raises instead.
    `kind` forces "memory" or "stream" for a folder (default: memory when its images share one size and fit
    in `memory_limit` bytes). Raises UserError for anything the user can fix.
    """
    if in_chans not in (1, 3):
        raise UserError(f"in_chans must be 1 (grayscale) or 3 (RGB), not {in_chans}.")
    if kind not in (None, "memory", "stream"):
        raise UserError(f"kind must be memory or stream, not {kind}.")
    text = os.fspath(data)
    if text in NAMED_SOURCES:
        if Path(text).is_dir():
            warnings.warn(f"'{text}' names the built-in {text} set, not the folder ./{text} here; to read the "
                          f"folder, give its path: ./{text}", UserWarning, stacklevel=2)
        classes, splits = _load_named(text, data_dir, in_chans)
        kind_used, name = "memory", text
    else:
        path = user_path(text)
        if not path.exists() and os.sep not in text and "/" not in text:
            raise UserError(
                f"unknown data source '{text}'{did_you_mean(text, NAMED_SOURCES)}; give cifar10, "
                f"cifar100, digits or an ImageFolder directory."
            )
        cache = user_path(cache_dir) if cache_dir is not None else default_cache_dir()
        if path.is_dir() and cache.resolve().is_relative_to(path.resolve()):
            raise UserError(
                f"the cache directory {cache} is inside the data folder {path}; choose another "
                f"with --cache-dir or RESNET_CACHE_DIR."
            )
        classes, splits, kind_used = _load_folder(
            str(path.resolve()) if path.exists() else text,
            cache_dir=cache,
            in_chans=in_chans,
            kind=kind,
            max_pixels=max_pixels,
            workers=workers,
            memory_limit=memory_limit,
        )
        name = path.name or text
    skipped = [s for sp in splits.values() for s in sp.skipped]
    _report_skips(skipped, strict)
    for split_name, sp in splits.items():
        if len(sp) == 0:
            raise UserError(
                f"the {split_name} split of {text} has no usable images (all {len(sp.skipped)} "
                f"were skipped); check the files."
            )
    per_split_skips = {k: v.skipped for k, v in splits.items()}
    carve_val(splits, val_size, seed)
    for k, sp in splits.items():
        sp.skipped = per_split_skips.get(k, [])
    stats_split = splits.get("train") or next(iter(splits.values()))
    mean, std = _memory_stats(stats_split) if stats_split.kind == "memory" else _stream_stats(stats_split)
    return Dataset(
        name=name,
        classes=classes,
        kind=kind_used,
        splits=splits,
        in_chans=in_chans,
        mean=mean,
        std=std,
        skipped=skipped,
        source=text,
    )
