"""Decoding one image file into uint8 C x H x W, for every mode Pillow reads, never dying on a bad file.

Every odd format people have in their folders is turned into the same thing: RGB (or grayscale for
`in_chans=1`), 8 bits per channel, upright. A file that cannot be decoded raises `BadImage` with the reason,
so a caller can skip it with a warning (or stop at once under `strict`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Bump when decoding changes what pixels come out, so caches made by the old code are not reused.
DECODE_VERSION = 3  # 2: PNG tRNS transparency in L and RGB images composited onto white; 3: rotated TIFF
# sizes, strips refused by the streaming index, float TIFFs in a 16-bit range

# Largest image (in pixels) we agree to decode: Pillow's own default limit (about 89 megapixels). A file
# whose header claims more is refused as a decompression bomb before a single pixel is decoded.
MAX_PIXELS = 89_478_485

# Longest side over shortest side that a view may resize: the views scale the shorter side to 256-640 pixels,
# so a 1 x 80,000 strip (within MAX_PIXELS) would become 256 x 20 million (60 GB as floats).
MAX_ASPECT = 100

# What a transparent pixel becomes: white, as the image would show on a page (documented in docs/data.md).
BACKGROUND = (255, 255, 255)

ORIENTATION = 0x0112  # the EXIF tag

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

# A truncated file must fail loudly, never come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A file that is not a decodable image; `str(err)` is the reason, without the path."""


def check_aspect(arr: np.ndarray) -> np.ndarray:
    """`arr` (C x H x W) unchanged, or BadImage when it is too thin to resize by its shorter side."""
    check_aspect_size(*arr.shape[-2:])
    return arr


def check_aspect_size(h: int, w: int) -> None:
    """BadImage when an H x W image is too thin to resize by its shorter side (the views' rule)."""
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise BadImage(f"is {w}x{h}, thinner than the {MAX_ASPECT}:1 the evaluation and training views can resize")


def is_image_name(name: str) -> bool:
    """True when `name` has an image extension and is not hidden (ImageFolder scanning)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `path` lazily (header only) after the checks that need no decoding; raises BadImage."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise BadImage(f"cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise BadImage("is an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's hard limit (2 x its MAX_IMAGE_PIXELS)
        raise BadImage(f"is larger than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels "
                       f"(a decompression bomb?)") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for junk input
        raise BadImage(f"is not an image Pillow can read ({type(err).__name__}: {_short(err)})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadImage(
            f"is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} (a decompression bomb?)"
        )
    if w == 0 or h == 0:
        img.close()
        raise BadImage(f"has no pixels ({w}x{h})")
    return img


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
    return text[:120]


def to_array(img: Image.Image, in_chans: int = 3) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to uint8 `in_chans` x H x W, upright, alpha composited."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, not {in_chans}")
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:  # check first: exif_transpose copies even upright images
            img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost us the image
        pass
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit grayscale: scale the full range to 8 bits (convert("L") would clip to white).
        arr = np.asarray(img)
        if mode == "F":
            top = float(np.nanmax(arr, initial=0.0))
            hi = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0  # 0-1, 8-bit or 16-bit range
            gray = np.clip(np.nan_to_num(arr) * (255.0 / hi), 0, 255).round().astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            hi = 65535 if mode.startswith("I;16") or int(arr.max(initial=0)) > 255 else 255
            gray = np.clip((arr * 255 + hi // 2) // hi, 0, 255).astype(np.uint8)
        out = gray[None]
        return np.repeat(out, 3, axis=0) if in_chans == 3 else out
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        # A PNG tRNS chunk (one transparent index, grey level or colour): Pillow applies it on the way to RGBA.
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if in_chans == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    arr = np.asarray(img, dtype=np.uint8)
    # Always a copy: ascontiguousarray returned a 1x1 image's read-only view of Pillow's buffer as it was.
    return arr[None].copy() if in_chans == 1 else arr.transpose(2, 0, 1).copy()


def decode_image(
    path: str | os.PathLike,
    in_chans: int = 3,
    *,
    max_pixels: int = MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode `path` to uint8 `in_chans` x H x W; raises BadImage with the reason when it cannot.

    `draft_size` (w, h): let a JPEG decoder skip detail it will not need (Pillow draft mode decodes at 1/2,
    1/4 or 1/8 scale in the DCT); the result is at least that size in both sides, never smaller.
    """
    img = open_image(path, max_pixels)
    try:
        with img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("L" if in_chans == 1 else "RGB", draft_size)
            img.load()
            return to_array(img, in_chans)
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, broken chunks, unsupported features
        raise BadImage(f"cannot be decoded ({type(err).__name__}: {_short(err)})") from None


def image_size(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(H, W) of an image as stored after EXIF rotation, from its header only; raises BadImage."""
    img = open_image(path, max_pixels)
    with img:
        w, h = img.size
        if img.format == "TIFF" and (w, h) != (img.tag_v2.get(256), img.tag_v2.get(257)):
            # Pillow (13 at least) turns a TIFF upright as it loads it and already reports the upright size
            # for orientations 5-8: swapping again would give the stored size, not the decoded one.
            return (h, w)
        try:
            orientation = img.getexif().get(ORIENTATION, 1)
        except Exception:  # noqa: BLE001
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x H x W (or 3 x H x W) -> N x 1 x H x W luma, ITU-R 601-2 as Pillow's convert("L")."""
    r, g, b = (rgb[..., i, :, :].astype(np.uint32) for i in range(3))
    gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return gray.astype(np.uint8)[..., None, :, :]
