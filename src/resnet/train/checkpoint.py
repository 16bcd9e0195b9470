"""The resumable checkpoint: full training state in one atomically written file.

Contents (all tensors or plain Python values, so `torch.load(weights_only=True)` reads it and nothing is
unpickled): format, config, iteration, epoch, batch (the data position), model, ema, optimizer, schedule,
scaler, rng (one entry per rank: torch, cuda, numpy, python), window (partial training metrics), clock.
"""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_write_bytes
from ..errors import UserError

FORMAT = "resnet-checkpoint/1"
NAME = "checkpoint.pt"
# Test hook: seconds to sleep between writing the temporary file and renaming it (to kill mid-write).
_SLOW_WRITE_ENV = "RESNET_TEST_CHECKPOINT_SLEEP"


def rng_state() -> dict:
    """This process's random number generators, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # the setters take CPU byte tensors only
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_key"].cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, tuple | list) else x


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def save(path: str | os.PathLike, state: dict) -> None:
    """Write `state` so that `path` is always either the previous checkpoint or this complete one."""
    if not all_finite(state["model"]):
        raise RuntimeError("refusing to write a checkpoint with non-finite weights")
    buf = io.BytesIO()
    torch.save(state, buf)
    pause = os.environ.get(_SLOW_WRITE_ENV)  # tests kill the process inside this window
    atomic_write_bytes(path, buf.getbuffer(), before_rename=(lambda: time.sleep(float(pause))) if pause else None)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save` without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); delete it to start "
                        f"the run over, or point --out at a new folder.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a resnet training checkpoint; point --out at a new folder.")
    return state


def remove_stale_temps(folder: Path) -> None:
    """Temporary files left by a process killed while writing (the real files are untouched)."""
    for pattern in (".*.tmp", ".*.tmp.png"):  # atomic_write_bytes's and plot_curves's temporary names
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)
