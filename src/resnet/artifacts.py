"""The trained-model artifact: `model.safetensors` (weights) + `model.json` (everything else).

`model.json` holds what is needed to rebuild and use the model without the run that made it:
{"format": "resnet-model/1", "arch": name, "options": {create_model options}, "classes": [names in
index order], "mean": [per channel, 0-1 pixel units], "std": [...], "input_size": [C, H, W],
"eval_view": "full" | "flip" | "center" | "10crop" | "multiscale", "recipe": name or null, "metrics": {...},
"data": the source the run trained on (a name, or a folder's absolute path; `resnet eval`'s default),
"val_split": {"val_size", "seed", "images", "digest"} when the run carved its validation images out of train:
the count it carved from, and for a folder a fingerprint of the files carved (`resnet eval` refuses the same
carve on a folder that changed since)}.
Weights never pass through pickle: safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

FORMAT = "resnet-model/1"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: reading it means setting it for a moment, and a file another thread created in that
# moment (a TensorBoard writer during a checkpoint) would be world-writable.
_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview,
                       before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one (temp + fsync +
    rename), never a half-written file, whatever kills the process. `before_rename` runs between the fsync
    and the rename (tests use it to kill a process in the middle of a write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to their writer
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `module.` (DDP/DataParallel) and `_orig_mod.` (torch.compile) prefixes wherever they stand."""
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
        out[".".join(parts)] = value
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers, so no wrapper prefix reaches a file."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        else:
            return model


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a state dict: catches any flipped bit in the
    tensor data, which neither safetensors nor torch.load check on their own."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model_artifacts(out_dir: str | os.PathLike, model: torch.nn.Module, meta: dict) -> Path:
    """Write `model.safetensors` and `model.json` into `out_dir` atomically; returns the weights path.

    `meta` must hold at least arch, options, classes, mean, std, input_size; it is stored as given plus the
    format tag.
    """
    missing = [k for k in ("arch", "options", "classes", "mean", "std", "input_size") if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(unwrap(model).state_dict()).items()}
    weights = out_dir / "model.safetensors"
    # safetensors has no checksum of its own: the digest lets loading catch a flipped bit in the weights. It
    # is in the file's header too, so a copy of model.safetensors alone is still checked.
    digest = state_digest(state)
    atomic_write_bytes(weights, save_safetensors(state, metadata={"format": FORMAT, "arch": str(meta["arch"]),
                                                                  "weights_sha256": digest}))
    doc = {"format": FORMAT, **meta, "weights_sha256": digest}
    atomic_write_bytes(out_dir / "model.json", (json.dumps(doc, indent=2) + "\n").encode())
    return weights
