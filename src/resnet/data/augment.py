"""The paper's training augmentations, applied to whole batches with tensor ops (on the loader's device).

No per-sample Python runs in the hot loop: a batch of random crops and flips is one gather, a batch of
scale augmentations is one `affine_grid` + `grid_sample`, the colour augmentation one matrix product.
Random numbers come from a CPU generator seeded per batch, so results do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# AlexNet-style PCA colour augmentation (Krizhevsky et al. 2012), as the paper's Sec. 3.4 uses it: the
# eigen-decomposition of ImageNet's RGB covariance, pixels in 0-1 units (values as in fb.resnet.torch).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class AugmentConfig:
    """Sizes of the augmentations and evaluation views; the defaults are the paper's, tests use tiny ones."""

    pad: int = 4  # CIFAR: zero padding on each side before the random crop (Sec. 4.2)
    crop: int = 224  # ImageNet: training crop and evaluation crop (Sec. 3.4)
    resize: int = 256  # ImageNet: shorter side before the evaluation centre crop / 10-crop
    scale_min: int = 256  # ImageNet: shorter side drawn uniformly from [scale_min, scale_max]
    scale_max: int = 480
    scales: tuple[int, ...] = (224, 256, 384, 480, 640)  # fully-convolutional multi-scale testing
    multiscale_flip: bool = True  # also score each scale's mirror image (as in VGG's dense evaluation)
    pca_std: float = 0.1  # standard deviation of the PCA colour-augmentation alphas; 0 turns it off


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (seed, epoch, rank, batch): independent streams per batch."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(batch_seed(*parts))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) N x C x H x W -> float32 (x/255 - mean) / std; mean, std in 0-1 units."""
    # In-place multiply-add on the float copy: several times faster on CPU than a broadcast addcmul.
    out = x.float()
    return out.mul_((1.0 / (255.0 * std)).view(1, -1, 1, 1)).add_((-mean / std).view(1, -1, 1, 1))


Random = torch.Generator | torch.Tensor


def _uniforms(rand: Random, b: int, k: int) -> torch.Tensor:
    """b x k uniforms in [0, 1): drawn from a generator, or given (one row per sample, drawn per epoch
    from (seed, epoch) by the loader, so a sample's augmentation does not depend on batch, rank or resume)."""
    if isinstance(rand, torch.Generator):
        return torch.rand(b, k, generator=rand, dtype=torch.float64)
    return rand[:, :k].double()


def _integers(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Uniform integers in [low, high] from uniforms in [0, 1)."""
    return (low + (u * (high - low + 1)).floor().long()).clamp(max=high)


def crop_flip(x: torch.Tensor, pad: int, rand: Random) -> torch.Tensor:
    """CIFAR augmentation on a batch: pad `pad` zeros on each side, random H x W crop, random horizontal flip.

    One gather for the whole batch: row and column indices per sample (the flip reverses the columns).
    Works on uint8 (cheapest: 1 byte per value) or float, on any device. `rand`: a generator, or b x 3
    uniforms per sample (row offset, column offset, flip).
    """
    b, c, h, w = x.shape
    u = _uniforms(rand, b, 3)
    dev = x.device
    oy, ox = _integers(u[:, 0], 0, 2 * pad).to(dev), _integers(u[:, 1], 0, 2 * pad).to(dev)
    flips = (u[:, 2] < 0.5).to(dev)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # B x H
    cols = ox[:, None] + torch.where(flips[:, None], (w - 1) - ar_w, ar_w)  # B x W
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    hp, wp = h + 2 * pad, w + 2 * pad
    # Flat index of every output value into the padded batch: (sample * C + channel) planes of hp x wp,
    # then row * wp + col; one index_select reads the whole augmented batch.
    pix = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)
    planes = torch.arange(b * c, device=dev).view(b, c, 1) * (hp * wp)
    return padded.reshape(-1).index_select(0, (pix + planes).view(-1)).view(b, c, h, w)


def scale_crop_flip(x: torch.Tensor, out: int, scale_min: int, scale_max: int, rand: Random) -> torch.Tensor:
    """ImageNet scale augmentation on a batch of equal-size float images: per sample, shorter side resized
    to a random integer in [scale_min, scale_max], a random `out` x `out` crop, a random flip.

    One bilinear `grid_sample` does all three (no antialiasing; the streaming path, which resizes with
    Pillow, is the exact one). `rand`: a generator, or b x 4 uniforms per sample.
    """
    b, _, h, w = x.shape
    u = _uniforms(rand, b, 4)
    short = _integers(u[:, 0], scale_min, scale_max).double()
    flips = u[:, 3] < 0.5
    factor = short / min(h, w)  # resize factor per sample
    rh, rw = h * factor, w * factor  # resized size
    top = u[:, 1] * (rh - out).clamp(min=0)
    left = u[:, 2] * (rw - out).clamp(min=0)
    # Crop centre in normalised [-1, 1] input coordinates, crop half-size as a fraction of the input.
    cy = (top + out / 2) / rh * 2 - 1
    cx = (left + out / 2) / rw * 2 - 1
    sy, sx = out / rh, out / rw
    sx = torch.where(flips, -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pca_lighting(x: torch.Tensor, std: float, rand: Random) -> torch.Tensor:
    """AlexNet PCA colour augmentation on a float batch in 0-1 units (RGB): adds eigvec @ (alpha * eigval)
    per image, alpha ~ N(0, std^2) per image and component. Grayscale batches are returned unchanged.
    `rand`: a generator, or b x 3 standard normals per sample."""
    if std <= 0 or x.shape[1] != 3:
        return x
    is_gen = isinstance(rand, torch.Generator)
    normals = torch.randn(x.shape[0], 3, generator=rand) if is_gen else rand.float()
    alpha = normals * std
    eigval = torch.tensor(IMAGENET_EIGVAL)
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    rgb = (alpha * eigval) @ eigvec.T  # B x 3
    return x + rgb.to(x.device, x.dtype)[:, :, None, None]
