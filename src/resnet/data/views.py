"""Evaluation views: each maps images to a batch of views whose scores are averaged.

- "full": the image as it is (the paper's CIFAR testing: the single original 32x32 view);
- "flip": the image and its mirror image, logits averaged (the flip test-time augmentation that the
  cifar10-fast recipe evaluates with, as airbench (Jordan 2024) does; not the paper's protocol);
- "center": shorter side resized to 256, the centre 224x224 crop (the usual single-crop ImageNet figure);
- "10crop": the four corner crops and the centre crop of the 256-resized image, and their mirror images
  (Sec. 3.4, "standard 10-crop testing", from Krizhevsky et al. 2012);
- "multiscale": the fully-convolutional form, shorter side in {224, 256, 384, 480, 640}, scores averaged
  over the scales (and their mirror images, as in VGG's dense evaluation).
Sizes come from `AugmentConfig`, so tests run with tiny images.

The paper's two multi-view protocols average *softmax scores* over the views, as their sources do (10-crop:
Krizhevsky et al. 2012 average the softmax predictions; multi-scale: Simonyan & Zisserman 2015 average the
class posteriors); their combined "logits" are the log of the averaged probabilities, so softmax and top-k
of them are the averaged scores'. "flip" (ours) averages logits, as airbench does.

Functions here take float batches N x C x H x W (any scale); the loaders give views already normalised,
and `view_logits(model, x)` turns whatever a loader yields into N x classes logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import AugmentConfig

VIEWS = ("full", "flip", "center", "10crop", "multiscale")
ALIASES = {
    "full+flip": "flip",
    "hflip": "flip",
    "cifar": "full",
    "original": "full",
    "centre": "center",
    "center_crop": "center",
    "ten_crop": "10crop",
}


def canonical_view(view: str) -> str:
    """The view's canonical name; ValueError for an unknown one."""
    name = ALIASES.get(view, view)
    if name not in VIEWS:
        raise ValueError(f"unknown evaluation view {view!r}; choose one of {', '.join(VIEWS)}")
    return name


def shorter_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(H, W) with the shorter side `short` and the aspect ratio kept."""
    if h <= w:
        return short, max(1, round(w * short / h))
    return max(1, round(h * short / w)), short


def resize_shorter(x: torch.Tensor, short: int) -> torch.Tensor:
    """Bilinear, antialiased (as Pillow) resize of a float batch so its shorter side is `short`."""
    h, w = x.shape[-2:]
    size = shorter_side_size(h, w, short)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return x[..., top : top + crop, left : left + crop]


def center_view(x: torch.Tensor, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """N x C x crop x crop: shorter side to `resize`, then the centre crop."""
    return center_crop(resize_shorter(x, resize), crop)


def ten_crop(x: torch.Tensor, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """N x 10 x C x crop x crop: 4 corners + centre of the `resize` image, then the same five mirrored."""
    x = resize_shorter(x, resize)
    h, w = x.shape[-2:]
    crops = [
        x[..., :crop, :crop],
        x[..., :crop, w - crop :],
        x[..., h - crop :, :crop],
        x[..., h - crop :, w - crop :],
        center_crop(x, crop),
    ]
    five = torch.stack(crops, dim=1)
    return torch.cat([five, five.flip(-1)], dim=1)


def multiscale(x: torch.Tensor, scales=(224, 256, 384, 480, 640), flip: bool = True) -> list[torch.Tensor]:
    """One N x V x C x h x w tensor per scale (V = 2 with the mirror image): the whole image, resized."""
    out = []
    for s in scales:
        r = resize_shorter(x, s)
        out.append(torch.stack([r, r.flip(-1)], dim=1) if flip else r[:, None])
    return out


@dataclass
class ViewBatch:
    """Several views per image: `groups` of (views G x C x h x w, owner G) where owner[i] is the image
    (0..n-1) that view i belongs to. Views of one group share a size, so each group is one forward pass."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    n: int
    probs: bool = False  # average softmax scores (the paper's 10-crop and multi-scale), not logits

    def to(self, device, **kwargs) -> ViewBatch:
        return ViewBatch([(v.to(device, **kwargs), o.to(device)) for v, o in self.groups], self.n, self.probs)

    def logits(self, model) -> torch.Tensor:
        """N x classes: the model's logits averaged over every view of each image (with `probs`, the log
        of its averaged softmax scores)."""
        total, count = None, None
        for views, owner in self.groups:
            out = _scores(model(views), self.probs)
            if total is None:
                total = out.new_zeros(self.n, out.shape[1])
                count = out.new_zeros(self.n, 1)
            total.index_add_(0, owner, out)
            count.index_add_(0, owner, out.new_ones(len(owner), 1))
        return _as_logits(total / count, self.probs)


# The views whose scores are averaged as probabilities (see the module's docstring).
PROB_AVERAGED = ("10crop", "multiscale")


def averages_probs(view: str) -> bool:
    return canonical_view(view) in PROB_AVERAGED


def _scores(logits: torch.Tensor, probs: bool) -> torch.Tensor:
    """What is averaged over views: softmax scores (`probs`) or the logits themselves."""
    return logits.float().softmax(1) if probs else logits


def _as_logits(mean: torch.Tensor, probs: bool) -> torch.Tensor:
    """Averaged scores back as logits: the log of averaged probabilities (softmax of it gives them back)."""
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log() if probs else mean


def combine_views(out: torch.Tensor, view: str) -> torch.Tensor:
    """V x classes logits of one image's views -> its classes logits, by the rule of `view`."""
    probs = averages_probs(view)
    return _as_logits(_scores(out, probs).mean(0), probs)


def stacked_views(x: torch.Tensor, probs: bool = False) -> ViewBatch:
    """N x V x C x h x w -> one group of N*V views."""
    n, v = x.shape[:2]
    return ViewBatch([(x.flatten(0, 1), torch.arange(n, device=x.device).repeat_interleave(v))], n, probs)


def make_views(x: torch.Tensor, view: str, cfg: AugmentConfig | None = None) -> torch.Tensor | ViewBatch:
    """The evaluation view `view` of a float batch of equal-size images: a tensor (one view per image) or a
    ViewBatch (several)."""
    cfg = cfg or AugmentConfig()
    view = canonical_view(view)
    if view == "full":
        return x
    if view == "flip":
        return stacked_views(torch.stack([x, x.flip(-1)], dim=1))
    if view == "center":
        return center_view(x, cfg.resize, cfg.crop)
    if view == "10crop":
        return stacked_views(ten_crop(x, cfg.resize, cfg.crop), probs=averages_probs(view))
    groups = [stacked_views(m).groups[0] for m in multiscale(x, cfg.scales, cfg.multiscale_flip)]
    return ViewBatch(groups, x.shape[0], probs=averages_probs(view))


def view_logits(model, x: torch.Tensor | ViewBatch) -> torch.Tensor:
    """Logits N x classes for what a loader yields: one view (a tensor) or several (averaged)."""
    return x.logits(model) if isinstance(x, ViewBatch) else model(x)
