"""Decode a folder once into a uint8 array on disk, memory-map it on later runs.

The cache key is a fingerprint of the file list, sizes, mtimes and decode settings, so a changed folder is
decoded again. Files are written under temp names, fsynced and renamed, and the whole build runs under a
file lock: two processes (or torchrun ranks) never read a half-written cache, and only one decodes.
The cache lives in the cache directory, never inside the data folder (which may be read-only or shared).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts import atomic_write_bytes
from .decode import DECODE_VERSION, BadImage, check_aspect, check_aspect_size, decode_image, image_size
from .sources import file_lock

CACHE_FORMAT = "resnet-data-cache/1"


def cache_paths(cache_dir: Path, root: str, split: str, fingerprint: str) -> tuple[Path, Path, str]:
    """(images .npy, meta .json, slot): the slot names the (folder, split), the fingerprint its contents."""
    slot = hashlib.sha256(f"{os.path.realpath(root)}\0{split}".encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = f"folder-{slot}-{fingerprint[:20]}"
    return cache_dir / f"{stem}.u8.npy", cache_dir / f"{stem}.json", slot


def fit_to(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize C x H x W uint8 so it covers (height, width), then centre-crop to exactly that size."""
    c, h, w = arr.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0))
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - height) // 2, (nw - width) // 2
    out = np.asarray(img)[top : top + height, left : left + width]
    return out[None].copy() if c == 1 else np.ascontiguousarray(out.transpose(2, 0, 1))


# -------------------------------------------------------------------------------------- pool workers
def _decode_chunk(job: tuple) -> tuple[list[tuple[int, str]], list[int]]:
    """Decode paths[start:start+len] into slots of the open .npy; returns (bad (index, reason), resized)."""
    out_path, start, paths, in_chans, height, width, max_pixels = job
    images = np.load(out_path, mmap_mode="r+")
    bad, resized = [], []
    for offset, path in enumerate(paths):
        i = start + offset
        try:
            arr = decode_image(path, in_chans, max_pixels=max_pixels)
            if arr.shape[1:] != (height, width):
                # A 1 x 3000 strip would be scaled to cover 224 x 224 whole: 224 x 672,000 pixels (GBs)
                arr = fit_to(check_aspect(arr), height, width)
                resized.append(i)
        except BadImage as err:
            bad.append((i, str(err)))
            continue
        images[i] = arr
    images.flush()
    del images
    return bad, resized


def _check_chunk(job: tuple) -> list[tuple[int, str, int, int]]:
    """Validate files for the streaming path: (index, reason or '', H, W); JPEGs decoded at 1/8 scale."""
    start, paths, in_chans, max_pixels = job
    out = []
    for offset, path in enumerate(paths):
        try:
            h, w = image_size(path, max_pixels)
            # The loader refuses a strip when a view resizes it, mid-run: refuse it here, where `resnet data`,
            # the skip counts and --strict see it before training starts.
            check_aspect_size(h, w)
            decode_image(path, in_chans, max_pixels=max_pixels, draft_size=(1, 1))
            out.append((start + offset, "", h, w))
        except BadImage as err:
            out.append((start + offset, str(err), 0, 0))
    return out


def _pool_map(fn, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    # fork is cheap and the children only run Pillow and numpy; spawn when CUDA is live (fork would break it).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    try:
        import torch

        if torch.cuda.is_initialized():
            method = "spawn"
    except ImportError:  # pragma: no cover
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process ... fork()"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=1)


def _chunks(n: int, workers: int, size: int = 512) -> list[tuple[int, int]]:
    size = max(16, min(size, -(-n // max(1, workers * 4))))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def default_workers() -> int:
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


# ----------------------------------------------------------------------------------- memory cache
def build_or_load_memory(
    paths: list[str],
    *,
    root: str,
    split: str,
    fingerprint: str,
    cache_dir: Path,
    in_chans: int,
    size: tuple[int, int],
    max_pixels: int,
    workers: int | None = None,
) -> tuple[np.ndarray, dict]:
    """(images N x C x H x W uint8 memory-mapped, meta) for `paths`, decoded now or read from the cache.

    meta: {"bad": [[index, reason]], "resized": [index], "fingerprint", ...}; bad slots hold zeros.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    npy, meta_path, slot = cache_paths(cache_dir, root, split, fingerprint)
    shape = (len(paths), in_chans, *size)
    meta = _read_meta(meta_path, fingerprint, npy)
    images = _open_images(npy, shape) if meta is not None else None
    if images is None:
        with file_lock(cache_dir / f"folder-{slot}.lock"):
            meta = _read_meta(meta_path, fingerprint, npy)
            images = _open_images(npy, shape) if meta is not None else None
            if images is None:
                meta = _build_memory(
                    paths,
                    npy,
                    meta_path,
                    fingerprint,
                    in_chans,
                    size,
                    max_pixels,
                    workers or default_workers(),
                )
                _remove_stale(cache_dir, slot, keep=(npy.name, meta_path.name))
                images = np.load(npy, mmap_mode="c")
    return images, meta


def _open_images(npy: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array, memory-mapped; None when its file is damaged (an unreadable header, another shape or
    type), so that it is decoded again instead of failing every later run."""
    try:
        images = np.load(npy, mmap_mode="c")
    except (ValueError, EOFError):
        return None
    return images if images.dtype == np.uint8 and images.shape == shape else None


def _read_meta(meta_path: Path, fingerprint: str, npy: Path | None) -> dict | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        return None
    if npy is not None and (not npy.exists() or npy.stat().st_size != meta.get("npy_bytes")):
        return None
    return meta


def _build_memory(
    paths, npy: Path, meta_path: Path, fingerprint: str, in_chans: int, size, max_pixels: int, workers: int
) -> dict:
    height, width = size
    fd, tmp = tempfile.mkstemp(prefix=f".{npy.name}.", suffix=".tmp", dir=npy.parent)
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(paths), in_chans, height, width)
        )
        arr.flush()
        del arr
        # Reserve the blocks now: a full disk is then an OSError here, not a SIGBUS in a decoding worker
        # writing through the memory map (which would kill it, or hang the pool waiting for it).
        with open(tmp, "rb+") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except (AttributeError, OSError) as err:  # a file system without it: go on as before
                if getattr(err, "errno", None) not in (None, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        jobs = [
            (tmp, s, paths[s:e], in_chans, height, width, max_pixels) for s, e in _chunks(len(paths), workers)
        ]
        bad, resized = [], []
        for b, r in _pool_map(_decode_chunk, jobs, workers):
            bad += b
            resized += r
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, npy)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "decode_version": DECODE_VERSION,
        "n": len(paths),
        "shape": [in_chans, height, width],
        "npy_bytes": npy.stat().st_size,
        "bad": sorted([list(b) for b in bad]),
        "resized": sorted(resized),
    }
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    return meta


def _remove_stale(cache_dir: Path, slot: str, keep: tuple[str, ...]) -> None:
    """Delete older caches of the same folder and split (their folder changed since), and the temporary
    files of builds that were killed (called under the slot's lock: no live build owns one)."""
    for p in [*cache_dir.glob(f"folder-{slot}-*"), *cache_dir.glob(f".folder-{slot}-*.tmp")]:
        if p.name not in keep:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ stream index
def build_or_load_index(
    paths: list[str],
    *,
    root: str,
    split: str,
    fingerprint: str,
    cache_dir: Path,
    in_chans: int,
    max_pixels: int,
    workers: int | None = None,
) -> dict:
    """Validate every file of a streamed split once (cached): {"bad": [[i, reason]], "sizes": [[H, W]]}."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _, meta_path, slot = cache_paths(cache_dir, root, split, fingerprint)
    meta_path = meta_path.with_name(meta_path.name.replace(".json", ".stream.json"))
    meta = _read_meta(meta_path, fingerprint, None)
    if meta is None:
        with file_lock(cache_dir / f"folder-{slot}.lock"):
            meta = _read_meta(meta_path, fingerprint, None)
            if meta is None:
                workers = workers or default_workers()
                jobs = [(s, paths[s:e], in_chans, max_pixels) for s, e in _chunks(len(paths), workers)]
                rows = [r for part in _pool_map(_check_chunk, jobs, workers) for r in part]
                meta = {
                    "format": CACHE_FORMAT,
                    "fingerprint": fingerprint,
                    "n": len(paths),
                    "bad": [[i, reason] for i, reason, _, _ in rows if reason],
                    "sizes": [[h, w] for _, _, h, w in rows],
                }
                atomic_write_bytes(meta_path, json.dumps(meta).encode())
                _remove_stale(cache_dir, slot, keep=(meta_path.name,))
    return meta
