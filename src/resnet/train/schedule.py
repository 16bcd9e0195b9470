"""Iteration-based learning-rate schedules: a table of shapes, plus the paper's two stateful rules.

- multistep (Sec. 4.2): lr x lr_decay at each milestone iteration.
- plateau (Sec. 3.4): lr x lr_decay when the validation error stops improving.
- cosine (Loshchilov & Hutter 2017, SGDR) and onecycle (Smith & Topin 2017, linear up then down): ours.
- ramp (`ramp_iters`): a linear ramp from 0 over the first iterations, before any of the shapes.
- warm-up (Sec. 4.2, ResNet-110/1202): a constant `warmup_lr` until the training error is below
  `warmup_until_train_err`, then the schedule proper.

The state is plain numbers so it travels in a checkpoint loaded with weights_only=True.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _multistep(s: LRSchedule, it: int) -> float:
    # With ramp_iters, the linear ramp first, as Goyal et al. 2017 ("gradual warmup") put before their steps.
    return (_ramp(s, it) or 1.0) * s.lr_decay ** sum(1 for m in s.milestones if it >= m)


def _plateau(s: LRSchedule, it: int) -> float:
    return (_ramp(s, it) or 1.0) * s.lr_decay ** s.state["decays"]


def _ramp(s: LRSchedule, it: int) -> float | None:
    return (it + 1) / s.ramp_iters if it < s.ramp_iters else None


def _cosine(s: LRSchedule, it: int) -> float:
    ramp = _ramp(s, it)
    if ramp is not None:
        return ramp
    t = (it - s.ramp_iters) / max(1, s.max_iters - s.ramp_iters)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _onecycle(s: LRSchedule, it: int) -> float:
    ramp = _ramp(s, it)
    if ramp is not None:
        return ramp
    return max(0.0, (s.max_iters - it) / max(1, s.max_iters - s.ramp_iters))


SHAPES: dict[str, Callable[[LRSchedule, int], float]] = {
    "multistep": _multistep,
    "plateau": _plateau,
    "cosine": _cosine,
    "onecycle": _onecycle,
}


class LRSchedule:
    """lr as a function of the iteration (and, for warm-up and plateau, of the observed errors)."""

    def __init__(self, kind: str, lr: float, max_iters: int, milestones: list[int] = (),
                 lr_decay: float = 0.1, warmup_lr: float = 0.0, warmup_until_train_err: float = 0.8,
                 ramp_iters: int = 0,
                 plateau_patience: int = 3, plateau_threshold: float = 0.001, min_lr: float = 0.0):
        self.shape = SHAPES[kind]
        self.kind, self.base_lr, self.max_iters = kind, lr, max_iters
        self.milestones, self.lr_decay, self.ramp_iters = list(milestones), lr_decay, ramp_iters
        self.warmup_lr, self.warmup_until = warmup_lr, warmup_until_train_err
        self.patience, self.threshold, self.min_lr = plateau_patience, plateau_threshold, min_lr
        self.state = {"warming": warmup_lr > 0, "warmup_end": -1, "decays": 0, "best": math.inf, "bad": 0}

    def lr(self, it: int) -> float:
        if self.state["warming"]:
            return self.warmup_lr
        return max(self.min_lr, self.base_lr * self.shape(self, it))

    def observe_train(self, it: int, train_top1_err: float) -> None:
        """End the warm-up once the training error (over the last log window) is below the bar."""
        if self.state["warming"] and train_top1_err < self.warmup_until:
            self.state.update(warming=False, warmup_end=it)

    def observe_val(self, it: int, val_top1_err: float) -> None:
        """Plateau rule: count evaluations without a real improvement; divide the lr after `patience`."""
        if self.kind != "plateau":
            return
        if val_top1_err < self.state["best"] - self.threshold:
            self.state.update(best=val_top1_err, bad=0)
            return
        self.state["bad"] += 1
        if self.state["bad"] >= self.patience:
            self.state.update(decays=self.state["decays"] + 1, bad=0, best=val_top1_err)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state.update(state)
