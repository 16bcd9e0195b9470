"""`make_loader`: batches of normalised float images for one split, deterministic and exactly resumable.

Memory splits: each batch is gathered from the uint8 array, moved to the device, augmented there with
tensor ops (`augment`), normalised. Stream splits: DataLoader workers decode and resize each file (Pillow,
draft mode), colour augmentation and normalisation run on the device.

Sample order: a permutation drawn from (seed, epoch), the same on every rank, padded to a multiple of
world_size and dealt round-robin (as torch's DistributedSampler), so the union of the ranks' batch i is the
single-process batch i of world_size times the size. Random augmentation parameters are a function of
(seed, epoch, sample) alone: `iter_epoch(epoch, start_batch)` yields exactly the batches an uninterrupted
epoch would have, and a sample is augmented the same whatever the rank, world size or batch size.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from . import views as views_mod
from .augment import AugmentConfig, crop_flip, generator, normalize, pca_lighting, scale_crop_flip
from .dataset import MemorySplit, SkippedImageWarning, StreamSplit
from .decode import BadImage, check_aspect, decode_image
from .views import ViewBatch, averages_probs, canonical_view, make_views, shorter_side_size

AUGMENTS = ("cifar", "imagenet", "none")


@contextlib.contextmanager
def single_thread(enabled: bool = True):
    """Run the batch ops on one CPU thread: they are small and memory-bound, and intra-op threads cost
    more in synchronisation than they gain (measured on 2 busy cores: 37k vs 7k images/s). Restores the
    caller's thread count, so the training step keeps its own."""
    if not enabled:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Loader:
    """What both loaders share: sharding, batch counts, normalisation constants."""

    def __init__(
        self,
        split,
        batch_size: int,
        *,
        train: bool,
        augment: str,
        mean,
        std,
        seed: int,
        rank: int,
        world_size: int,
        drop_last: bool | None,
        device,
        channels_last: bool,
        eval_view: str | None,
        cfg: AugmentConfig,
    ):
        if augment not in AUGMENTS:
            raise UserError(f"unknown augmentation '{augment}'; choose one of {', '.join(AUGMENTS)}.")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.split, self.batch_size, self.train, self.augment = split, batch_size, train, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.device = torch.device(device)
        self.channels_last, self.cfg = channels_last, cfg
        c = split.in_chans
        mean, std = list(mean), list(std)
        if len(mean) != c or len(std) != c:
            raise UserError(
                f"mean and std need {c} values (one per channel), not {len(mean)} and {len(std)}."
            )
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.eval_view = canonical_view(eval_view) if eval_view else None
        self.skipped: list[tuple[str, str]] = []

    # -- order
    def _rank_samples(self) -> int:
        n = len(self.split)
        return math.ceil(n / self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        per_rank = self._rank_samples()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample positions for `epoch`, in the order they are batched."""
        n = len(self.split)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = torch.randperm(n, generator=generator(self.seed, epoch, 1 << 20))
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:  # pad with the first samples again so every rank gets as many (DistributedSampler)
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank : total : self.world_size]

    def epoch_random(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x 4 uniforms, N x 3 normals): every sample's augmentation randomness for `epoch`."""
        if getattr(self, "_random_epoch", None) != epoch:
            gen = generator(self.seed, epoch, 2 << 20)
            n = len(self.split)
            uniforms = torch.rand(n, 4, generator=gen, dtype=torch.float64)
            self._random = (uniforms, torch.randn(n, 3, generator=gen))
            self._random_epoch = epoch
        return self._random

    def _batches(self, epoch: int, start_batch: int) -> Iterator[tuple[int, torch.Tensor]]:
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            yield b, order[b * self.batch_size : (b + 1) * self.batch_size]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def __iter__(self):
        return self.iter_epoch(0)

    def iter_epoch(self, epoch: int, start_batch: int = 0):  # pragma: no cover - overridden
        raise NotImplementedError


class MemoryLoader(_Loader):
    """Batches from a memory split, augmented on `device` with whole-batch tensor ops."""

    def __init__(self, split: MemorySplit, batch_size: int, **kw):
        super().__init__(split, batch_size, **kw)
        # On a GPU, hold the uint8 split there once (CIFAR-10 is 150 MB): no host-to-device copy per batch.
        self._on_device = self.device.type != "cpu" and split.images.numel() <= (2 << 30)
        self._device_images = split.images.to(self.device) if self._on_device else None
        self._labels_dev = split.labels.to(self.device) if self._on_device else None
        if self.train and self.augment == "cifar":
            self.mode = "cifar"
        elif self.train and self.augment == "imagenet":
            self.mode = "imagenet"
        else:
            self.mode = self.eval_view or ("center" if self.augment == "imagenet" else "full")

    def iter_epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor | ViewBatch, torch.Tensor]]:
        """(x, y) batches of `epoch` from batch `start_batch` on; x normalised float32 on the device."""
        for _, idx in self._batches(epoch, start_batch):
            with single_thread(self.device.type == "cpu"):
                if self._on_device:
                    idx_d = idx.to(self.device)
                    x, y = self._device_images[idx_d], self._labels_dev[idx_d]
                else:
                    x = self.split.gather(idx)
                    y = self.split.labels[idx]
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                out = self._transform(x, epoch, idx)
            yield out, y

    def _transform(self, x: torch.Tensor, epoch: int, idx: torch.Tensor):
        if self.mode in ("cifar", "imagenet"):
            uniforms, normals = self.epoch_random(epoch)
            uniforms, normals = uniforms[idx], normals[idx]
        if self.mode == "cifar":
            return self._finish(normalize(crop_flip(x, self.cfg.pad, uniforms), self.mean, self.std))
        if self.mode == "imagenet":
            cfg = self.cfg
            xf = scale_crop_flip(x.float().div_(255.0), cfg.crop, cfg.scale_min, cfg.scale_max, uniforms)
            xf = pca_lighting(xf, cfg.pca_std, normals)
            return self._finish(normalize(xf * 255.0, self.mean, self.std))
        xf = normalize(x, self.mean, self.std)
        out = make_views(xf, self.mode, self.cfg) if self.mode != "full" else xf
        return self._finish(out) if isinstance(out, torch.Tensor) else out


# ---------------------------------------------------------------------------------------- streaming
class _FileSet(torch.utils.data.Dataset):
    """Per-sample work for the streaming path, run in DataLoader workers: decode + resize + crop + flip.

    Keys are (position, epoch); randomness comes from (seed, epoch, position), so it does not depend on
    which worker gets which sample.
    """

    def __init__(self, split: StreamSplit, mode: str, cfg: AugmentConfig, seed: int):
        self.paths, self.labels = split.paths, split.labels
        self.in_chans, self.max_pixels = split.in_chans, split.max_pixels
        self.mode, self.cfg, self.seed = mode, cfg, seed

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int, short: int | None) -> np.ndarray:
        draft = None
        if short is not None:
            # Draft mode: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still has `short`
            # pixels or more on the shorter side; the resize below then has less to do.
            draft = (short, short)
        arr = decode_image(self.paths[i], self.in_chans, max_pixels=self.max_pixels, draft_size=draft)
        return check_aspect(arr) if short is not None else arr

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        try:
            return self._sample(i, epoch), int(self.labels[i]), i, ""
        except BadImage as err:
            return None, int(self.labels[i]), i, str(err)

    def _sample(self, i: int, epoch: int):
        cfg = self.cfg
        if self.mode == "imagenet":
            rng = np.random.default_rng([self.seed, epoch, i])
            short = int(rng.integers(cfg.scale_min, cfg.scale_max + 1))
            arr = _resize_shorter_np(self._decode(i, short), short)
            h, w = arr.shape[1:]
            top = int(rng.integers(0, max(0, h - cfg.crop) + 1))
            left = int(rng.integers(0, max(0, w - cfg.crop) + 1))
            arr = arr[:, top : top + cfg.crop, left : left + cfg.crop]
            if rng.random() < 0.5:
                arr = arr[:, :, ::-1]
            return torch.from_numpy(np.ascontiguousarray(arr))
        if self.mode in ("full", "flip"):
            return torch.from_numpy(self._decode(i, None))
        if self.mode == "center":
            arr = _resize_shorter_np(self._decode(i, cfg.resize), cfg.resize)
            h, w = arr.shape[1:]
            top, left = max(0, (h - cfg.crop) // 2), max(0, (w - cfg.crop) // 2)
            return torch.from_numpy(
                np.ascontiguousarray(arr[:, top : top + cfg.crop, left : left + cfg.crop])
            )
        if self.mode == "10crop":
            x = torch.from_numpy(_resize_shorter_np(self._decode(i, cfg.resize), cfg.resize))[None].float()
            return views_mod.ten_crop(x, cfg.resize, cfg.crop)[0].round().to(torch.uint8)
        # multiscale: one uint8 image per scale (sizes differ between images: grouped per image in collate)
        arr = self._decode(i, max(cfg.scales))  # draft no smaller than the largest scale needs
        return [torch.from_numpy(_resize_shorter_np(arr, s)) for s in cfg.scales]


def _resize_shorter_np(arr: np.ndarray, short: int) -> np.ndarray:
    """uint8 C x H x W resized (Pillow bilinear, antialiased) so the shorter side is `short`."""
    c, h, w = arr.shape
    nh, nw = shorter_side_size(h, w, short)
    if (nh, nw) == (h, w):
        return arr
    img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0))
    out = np.asarray(img.resize((nw, nh), Image.BILINEAR))
    return np.array(out[None] if c == 1 else out.transpose(2, 0, 1))  # a writable, contiguous copy


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    bad = [(s[2], s[3]) for s in samples if s[0] is None]
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    idx = torch.tensor([s[2] for s in good], dtype=torch.int64)
    if not good:
        return None, labels, idx, bad
    first = good[0][0]
    if not isinstance(first, list) and all(s[0].shape == first.shape for s in good):
        return torch.stack([s[0] for s in good]), labels, idx, bad
    return [s[0] for s in good], labels, idx, bad  # multi-scale views, or images of different sizes


class _EpochBatches:
    """A batch sampler whose content is set per epoch (so persistent workers survive across epochs)."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(_worker_id: int) -> None:
    """In each loading worker: leave SIGTERM/SIGINT to the main process. A scheduler (Slurm's scancel, a
    time limit) or Ctrl-C signals the whole process group; a worker killed by it would make the trainer
    fail instead of finishing its step and checkpointing. The main process shuts its workers down."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class StreamLoader(_Loader):
    """Batches decoded from files by DataLoader workers; colour augmentation and normalisation on the device.

    A file that fails to decode mid-run is dropped from its batch, warned about once and listed in
    `skipped` (the batch is one smaller), or with `strict` raises UserError. A training batch none of whose
    files can be read (storage gone) stops with UserError: skipping it would shift every later iteration
    off its batch, and on several processes leave one rank a step behind the others.
    """

    def __init__(
        self,
        split: StreamSplit,
        batch_size: int,
        *,
        num_workers: int | None = None,
        strict: bool = False,
        **kw,
    ):
        super().__init__(split, batch_size, **kw)
        if self.train and self.augment == "imagenet":
            self.mode = "imagenet"
        elif self.train and self.augment == "cifar":
            raise UserError(
                "the CIFAR augmentation needs images of one size held in memory; this folder is "
                "streamed, use augment=imagenet."
            )
        else:
            self.mode = self.eval_view or "center"
        if self.mode in ("full", "flip") and split.image_size is None:
            raise UserError(
                f"the {self.mode} view needs images of one size; this folder's sizes differ, use the "
                "center, 10crop or multiscale view."
            )
        self.strict = strict
        from .cache import default_workers

        workers = default_workers() if num_workers is None else num_workers
        self._sampler = _EpochBatches()
        self._dl = torch.utils.data.DataLoader(
            _FileSet(split, self.mode, self.cfg, self.seed),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            worker_init_fn=_ignore_stop_signals,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        if workers > 0:
            # The workers ignore SIGTERM (above), which is how the interpreter's exit stops them: a loader
            # still alive then (one made at module level) would hang the exit. Stop them first.
            atexit.register(_close_at_exit, weakref.ref(self))

    def close(self) -> None:
        """Stop the loading workers now (they also stop when the loader is garbage collected)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None

    def iter_epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor | ViewBatch, torch.Tensor]]:
        """(x, y) batches of `epoch` from batch `start_batch` on; x normalised float32 on the device."""
        batches = list(self._batches(epoch, start_batch))
        self._sampler.batches = [[(int(i), epoch) for i in idx] for _, idx in batches]
        for _, (x, y, idx, bad) in zip(batches, self._dl, strict=True):
            for i, reason in bad:
                self._skip(self.split.paths[i], reason)
            if x is None:
                if self.train:
                    path, reason = self.split.paths[bad[0][0]], bad[0][1]
                    raise UserError(f"no image of a training batch could be read (the first, {path}, {reason}); "
                                    f"check that the storage is available, then run the same command again "
                                    f"to resume from the last checkpoint.")
                continue
            with single_thread(self.device.type == "cpu"):
                out = self._transform(x, y, epoch, idx)
            yield out

    def _skip(self, path: str, reason: str) -> None:
        if self.strict:
            raise UserError(f"{path} {reason}; fix or remove it, or run without --strict to skip bad files.")
        if all(p != path for p, _ in self.skipped):
            self.skipped.append((path, reason))
            warnings.warn(f"skipped {path}: it {reason}", SkippedImageWarning, stacklevel=2)

    def _transform(self, x, y: torch.Tensor, epoch: int, idx: torch.Tensor):
        dev = self.device
        y = y.to(dev, non_blocking=True)
        if self.mode == "imagenet":
            xf = x.to(dev, non_blocking=True).float().div_(255.0)
            xf = pca_lighting(xf, self.cfg.pca_std, self.epoch_random(epoch)[1][idx])
            return self._finish(normalize(xf * 255.0, self.mean, self.std)), y
        if self.mode == "10crop":
            n = x.shape[0]
            v = normalize(x.to(dev).flatten(0, 1), self.mean, self.std)
            owner = torch.arange(n, device=dev).repeat_interleave(10)
            return ViewBatch([(self._finish(v), owner)], n, probs=averages_probs(self.mode)), y
        if self.mode == "multiscale":
            groups = []
            for owner, per_scale in enumerate(x):
                for img in per_scale:
                    v = normalize(img.to(dev)[None], self.mean, self.std)
                    if self.cfg.multiscale_flip:
                        v = torch.cat([v, v.flip(-1)])
                    groups.append((self._finish(v), torch.full((len(v),), owner, device=dev)))
            return ViewBatch(groups, len(x), probs=averages_probs(self.mode)), y
        if isinstance(x, list):  # pragma: no cover - guarded in __init__
            raise UserError("images of different sizes cannot share a batch in the full view.")
        xf = normalize(x.to(dev, non_blocking=True), self.mean, self.std)
        if self.mode == "flip":
            views = make_views(xf, "flip")
            return ViewBatch([(self._finish(v), o) for v, o in views.groups], views.n, views.probs), y
        return self._finish(xf), y


def make_loader(
    split: MemorySplit | StreamSplit,
    batch_size: int,
    *,
    train: bool,
    augment: str = "cifar",
    mean,
    std,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
    device="cpu",
    channels_last: bool = False,
    num_workers: int | None = None,
    eval_view: str | None = None,
    cfg: AugmentConfig | None = None,
    strict: bool = False,
) -> MemoryLoader | StreamLoader:
    """A loader over `split` (see docs/contracts.md, "Data"). `batch_size` is per process (rank).

    train=True: shuffled per epoch, augmented with `augment`, drop_last by default, ranks padded to equal
    length. train=False: in order, `eval_view` ("full", "center", "10crop", "multiscale"; default "full" for
    memory splits unless augment="imagenet", else "center"), ranks get disjoint shards without padding.
    `cfg` sets the augmentation and view sizes (the paper's by default).
    """
    kw = dict(
        train=train,
        augment=augment,
        mean=mean,
        std=std,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        device=device,
        channels_last=channels_last,
        eval_view=eval_view,
        cfg=cfg or AugmentConfig(),
    )
    if split.kind == "memory":
        return MemoryLoader(split, batch_size, **kw)
    return StreamLoader(split, batch_size, num_workers=num_workers, strict=strict, **kw)
