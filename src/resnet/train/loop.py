"""The training loop: one body for every precision and device, exact resume, clean stops.

`train(cfg, out_dir)` runs a recipe into a run directory, or resumes it from `checkpoint.pt`, or returns
the summary of a run that already finished. Precision is a switch on one body: autocast on or off
(bf16 on CPU/GPU, fp16 on GPU) and the grad scaler on or off (fp16 only) -- never a copied branch.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import artifacts
from ..errors import UserError, user_path
from ..models import create_model, model_spec, resolve_options
from . import checkpoint, distributed, outputs
from .config import TrainConfig, changed_settings, config_from_dict, validate
from .schedule import LRSchedule

_NAN_ENV = "RESNET_TEST_NAN_AT"  # test hook: make the loss NaN at this iteration
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {
    "sgd": lambda params, cfg, lr: torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay),
}


@dataclass(frozen=True)
class Plan:
    """The recipe's numbers at the batch size actually used (linear scaling rule, Goyal et al. 2017):
    at batch B, lr x B/ref_batch_size and every iteration count x ref_batch_size/B."""

    local_batch: int
    lr: float
    warmup_lr: float
    min_lr: float
    max_iters: int
    milestones: list[int]
    ramp_iters: int
    eval_every: int
    checkpoint_every: int


def make_plan(cfg: TrainConfig, world_size: int) -> Plan:
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {world_size} processes; "
                        f"use a multiple of {world_size}.")
    k = cfg.ref_batch_size / cfg.batch_size

    def iters(n: int) -> int:
        return max(1, round(n * k)) if n else 0

    return Plan(cfg.batch_size // world_size, cfg.lr / k, cfg.warmup_lr / k, cfg.min_lr / k, iters(cfg.max_iters),
                [iters(m) for m in cfg.milestones], iters(cfg.ramp_iters), iters(cfg.eval_every),
                iters(cfg.checkpoint_every))


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class EMA:
    """Exponential moving average of the weights (Polyak & Juditsky 1992) and of BatchNorm's running
    statistics; integer buffers (BN's step count) are copied.

    The statistics are averaged with the same decay as the weights so that the averaged model normalises
    with statistics of (nearly) the weights it has: copying the trained model's statistics instead pairs
    them with weights from hundreds of steps earlier, which measured 10 points worse on cifar10-fast
    (docs/results.md). The decay ramps as min(decay, (1 + t) / (10 + t)) so early averages are not
    dominated by the random initialisation (the warm-up of TensorFlow's ExponentialMovingAverage)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_f, new_f = list(self.model.parameters()), list(model.parameters())
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if eb.is_floating_point():
                ema_f.append(eb)
                new_f.append(b)
            else:
                eb.copy_(b)
        torch._foreach_lerp_(ema_f, new_f, 1 - d)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == y[:, None]
    return hit[:, 0].sum(), hit.any(dim=1).sum()


def _default_threads(info: distributed.DistInfo) -> int | None:
    if info.device.type != "cpu" or not info.enabled:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    return max(1, (os.cpu_count() or 1) // local)


class Trainer:
    """Holds one run's state; `fit()` trains to the end or to a stop signal."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, info: distributed.DistInfo, data_api):
        self.cfg, self.out, self.info = cfg, out_dir, info
        self.plan = make_plan(cfg, info.world_size)
        threads = cfg.threads or _default_threads(info)
        if threads:
            torch.set_num_threads(threads)
        if info.device.type == "cpu":
            from ..machine import keep_freed_memory

            keep_freed_memory()  # no page faults for each step's activation buffers
        self.resuming = (out_dir / checkpoint.NAME).exists()  # then the checkpoint, not init_from, has the weights
        if cfg.init_from and not self.resuming and not user_path(cfg.init_from).exists():
            raise UserError(f"init_from '{cfg.init_from}' does not exist; give a run folder, model.safetensors, "
                            f"checkpoint.pt or a .pth state dict of {cfg.arch}.")  # before a long data load
        self._build_data(data_api)
        self._build_model()
        self.it, self.wall_s, self.train_s, self.images = 0, 0.0, 0.0, 0
        self._reset_window()
        self.last_ckpt_iter = None
        state = self._load_checkpoint()
        self.log = outputs.RunLog(out_dir, None if state is None else self.it, enabled=info.is_main)

    # --- construction -------------------------------------------------------------------------------
    def _build_data(self, data_api) -> None:
        cfg, info = self.cfg, self.info
        self.ds = data_api.load_dataset(cfg.data, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                                        in_chans=cfg.in_chans, val_size=cfg.val_size, seed=cfg.data_seed,
                                        strict=cfg.strict_data)
        self._digests: dict | None = None  # data_digests(), computed when first needed
        if len(self.ds.classes) < 2:  # one class: the loss is zero from the start and every error 0%
            raise UserError(f"'{cfg.data}' has {len(self.ds.classes)} class ({', '.join(self.ds.classes)}); a "
                            f"classifier needs at least 2, each a folder of images under train/.")
        if cfg.schedule == "plateau" and "val" not in self.ds.splits:
            raise UserError(f"schedule=plateau lowers the lr when the validation error stops improving, but "
                            f"'{cfg.data}' has no validation split; give it one (val_size=5000, or a val/ "
                            f"folder) or use fixed steps (schedule=multistep milestones=[...]).")
        # The training split's own per-channel statistics, unless the settings name others (fine-tuning
        # weights trained with another normalisation).
        self.mean = [float(v) for v in (self.ds.mean if cfg.mean is None else cfg.mean)]
        self.std = [float(v) for v in (self.ds.std if cfg.std is None else cfg.std)]
        common = dict(mean=self.mean, std=self.std, seed=cfg.seed, rank=info.rank,
                      world_size=info.world_size, device=str(info.device), channels_last=cfg.channels_last,
                      num_workers=cfg.num_workers, strict=cfg.strict_data)
        self.train_loader = data_api.make_loader(self.ds.splits["train"], self.plan.local_batch, train=True,
                                                 augment=cfg.augment, **common)
        self.eval_loaders = {
            split: data_api.make_loader(self.ds.splits[split], max(1, cfg.eval_batch_size // info.world_size),
                                        train=False, augment="none", eval_view=cfg.eval_view, **common)
            for split in ("val", "test") if split in self.ds.splits
        }
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch < 1:
            raise UserError(f"the training split of '{cfg.data}' has fewer images than one batch of "
                            f"{self.plan.local_batch} per process; lower batch_size.")

    def _build_model(self) -> None:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        self.model_options = resolve_options(cfg.arch, num_classes=len(self.ds.classes),
                                             in_chans=cfg.in_chans, shortcut=cfg.shortcut,
                                             variant=cfg.variant,
                                             zero_init_residual=cfg.zero_init_residual)
        raw = create_model(cfg.arch, **self.model_options)
        if cfg.init_from and not self.resuming:
            self._start_from(raw)
        raw = raw.to(info.device)
        if cfg.sync_bn and info.enabled:
            raw = distributed.convert_sync_batchnorm(raw, info)
        if cfg.channels_last:
            raw = raw.to(memory_format=torch.channels_last)
        self.raw = raw
        self.ema = EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None
        model: nn.Module = raw
        if info.enabled:
            ids = [info.device.index] if info.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(raw, device_ids=ids)
        self.model = torch.compile(model) if cfg.compile else model
        self.optimizer = OPTIMIZERS[cfg.optimizer](raw.parameters(), cfg, self.plan.lr)
        self.schedule = LRSchedule(cfg.schedule, self.plan.lr, self.plan.max_iters, self.plan.milestones,
                                   cfg.lr_decay, self.plan.warmup_lr, cfg.warmup_until_train_err,
                                   self.plan.ramp_iters, cfg.plateau_patience, cfg.plateau_threshold,
                                   self.plan.min_lr)
        if cfg.precision == "fp16" and info.device.type != "cuda":
            raise UserError("precision=fp16 needs a CUDA GPU (it relies on a grad scaler); "
                            "use bf16 or fp32 on CPU.")
        self.amp_dtype = AMP_DTYPES[cfg.precision]
        if cfg.precision == "bf16" and info.device.type == "cpu":
            from ..machine import has_native_bf16

            if not has_native_bf16():
                self._say("note: this CPU has no AVX512_BF16 or AMX, so bf16 is emulated here and trains about 10x "
                          "slower than fp32 (docs/results.md); precision=fp32 is the fast setting on it.")
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _start_from(self, raw: nn.Module) -> None:
        """Load `init_from` into the new model (fine-tuning): every layer must fit, the classifier as
        `_classifier_from` says; then say what was loaded, and any normalisation the weights expect."""
        from ..loading import load_model

        cfg = self.cfg
        bottleneck = model_spec(cfg.arch).block == "bottleneck"
        src, meta = load_model(cfg.init_from, arch=cfg.arch,  # load_model expands ~ itself
                               options={"variant": cfg.variant} if bottleneck else {}, bare_only=True)
        self._refuse_other_networks(meta, bottleneck)
        state, keep, what = self._classifier_from(src.state_dict(), meta)
        raw.load_state_dict(state, strict=keep)
        self._say(f"starting from the weights in {meta['source']} ({meta['arch']}): {what}.")
        self._note_normalisation(meta)

    def _refuse_other_networks(self, meta: dict, bottleneck: bool) -> None:
        cfg, ours, theirs = self.cfg, self.model_options, meta["options"]
        if meta.get("bn_folded"):
            raise UserError(f"init_from '{meta['source']}' has its BatchNorm folded into the convolutions (an "
                            f"export); start from the run folder or its model.safetensors instead.")
        if bottleneck and cfg.variant == "v1" and "options" in meta.get("assumed", []):
            # v1 and v1.5 have the same shapes: nothing in the file tells them apart, and the recipes say v1
            raise UserError(f"init_from '{meta['source']}' does not record where {cfg.arch}'s down-sampling "
                            f"stride sits; torchvision and timm weights have it on the 3x3: add variant=v1.5 (for "
                            f"weights in the paper's layout, describe them first: resnet export FILE --arch "
                            f"{cfg.arch} --option variant=v1 --no-fold-bn --format safetensors --out W.safetensors).")
        keys = ("in_chans", "shortcut", "variant") if bottleneck else ("in_chans", "shortcut")
        fixes = ([f"arch={meta['arch']}"] if meta["arch"] != cfg.arch else []) + [
            f"{k}={theirs.get(k)}" for k in keys if theirs.get(k) != ours.get(k)]
        if fixes:
            def show(arch, opts):
                return f"{arch} ({', '.join(f'{k}={opts.get(k)}' for k in keys)})"
            raise UserError(f"init_from '{meta['source']}' holds {show(meta['arch'], theirs)}, not the "
                            f"{show(cfg.arch, ours)} this run trains; add {' '.join(fixes)} to train the "
                            f"network the weights are for.")

    def _classifier_from(self, state: dict, meta: dict) -> tuple[dict, bool, str]:
        """(state to load, whether it holds a classifier, what is loaded). The classifier's rows are kept,
        matched by class name, when the weights know every class of this data (or, where the file names no
        classes, when the counts agree); otherwise it stays newly initialised."""
        classes, theirs_n = list(self.ds.classes), meta["options"]["num_classes"]
        named = "classes" not in meta.get("assumed", [])
        if named and set(classes) <= set(meta["classes"]):
            rows = [list(meta["classes"]).index(c) for c in classes]
            state["fc.weight"], state["fc.bias"] = state["fc.weight"][rows], state["fc.bias"][rows]
            return state, True, ("all layers, the classifier included" if len(rows) == theirs_n else
                                 f"all layers, and the classifier's rows of this data's {len(rows)} classes")
        if not named and theirs_n == len(classes):
            return state, True, "all layers, the classifier included (its rows by position: the file names no classes)"
        return ({k: v for k, v in state.items() if not k.startswith("fc.")}, False,
                f"all layers but the classifier, which starts anew for this data's {len(classes)} classes "
                f"(the weights' {theirs_n} {'do not include them all' if named else 'do not fit'})")

    def _note_normalisation(self, meta: dict) -> None:
        """Say so when the weights were trained with statistics far from the ones this run uses unasked."""
        def differs(key: str, used: list[float]) -> bool:
            return getattr(self.cfg, key) is None and any(
                abs(a - b) > 0.02 for a, b in zip(meta[key], used, strict=True))

        def fmt(v):
            return "[" + ",".join(f"{x:.6g}" for x in v) + "]"

        if differs("mean", self.mean) or differs("std", self.std):
            origin = "assumed for a file that does not record it" if "mean" in meta.get("assumed", []) else "recorded"
            self._say(f"note: those weights were trained with mean={fmt(meta['mean'])} std={fmt(meta['std'])} "
                      f"({origin}); this run normalises with its data's own mean={fmt(self.mean)} "
                      f"std={fmt(self.std)}. To keep the weights' own, add mean={fmt(meta['mean'])} "
                      f"std={fmt(meta['std'])}.")

    # --- checkpoint -----------------------------------------------------------------------------------
    def _load_checkpoint(self) -> dict | None:
        path = self.out / checkpoint.NAME
        if not path.exists():
            return None
        # On the CPU: the random-number states must stay CPU tensors; load_state_dict moves the rest.
        state = checkpoint.load(path, map_location="cpu")
        old = state["config"]
        new = self.cfg.to_dict()
        diff = changed_settings(old, new)
        if diff:
            raise UserError(f"'{self.out}' holds a run with different settings ({', '.join(diff[:4])}); "
                            f"use the same recipe and overrides to resume it, or a new --out folder.")
        self._check_same_data(state.get("data"))
        self.raw.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != self.info.world_size:
            self._say(f"resuming a run checkpointed on {len(rngs)} process(es) on {self.info.world_size}: it "
                      f"continues with the same global batch, but not bit for bit.")
        if self.info.rank < len(rngs):
            checkpoint.set_rng_state(rngs[self.info.rank])
        self.it, self.wall_s = state["iteration"], state["wall_s"]
        self.train_s, self.images = state["train_s"], state["images"]
        # The saved window is the sum over all ranks: rank 0 carries it on, the others start from zero.
        self.window = {k: torch.tensor(v if self.info.is_main else 0.0, dtype=torch.float64,
                                       device=self.info.device) for k, v in state["window"].items()}
        self.window_t0 = time.perf_counter()
        self.last_ckpt_iter = self.it
        return state

    def _check_same_data(self, saved: dict | None) -> None:
        """Refuse to resume on a folder whose files changed: the seeded validation carve and the data order
        would differ, and images the run validated on could enter training."""
        now = self.data_digests()
        changed = [f"{name}: {old['images']} images then, {now[name]['images'] if name in now else 'none'} now"
                   for name, old in (saved or {}).items() if now.get(name, {}).get("digest") != old["digest"]]
        if changed:
            raise UserError(f"the images of '{self.cfg.data}' changed since '{self.out}' was checkpointed "
                            f"({'; '.join(changed)}), so its splits and data order would differ; restore the "
                            f"folder as it was to resume, or train on it in a new --out folder.")

    def save_checkpoint(self) -> None:
        # Weights can turn non-finite while the loss stays finite (an overflowing gradient or BN variance):
        # every rank checks and all stop together, with the sentence a non-finite loss gets.
        if distributed.any_rank(not checkpoint.all_finite(self.raw.state_dict()), self.info):
            raise UserError(f"the weights became non-finite by iteration {self.it} although the loss was "
                            f"finite; stopped without saving them ({self._last_good()}); try a lower lr or "
                            f"precision=fp32 in a new --out folder.")
        rngs = distributed.gather_objects(checkpoint.rng_state(), self.info)
        keys = ("loss", "top1", "top5", "n")  # the partial training-metrics window, summed over ranks
        window = dict(zip(keys, distributed.all_sum([float(self.window[k]) for k in keys], self.info), strict=True))
        problem = self._write_checkpoint(rngs, window) if self.info.is_main else None
        if distributed.any_rank(problem is not None, self.info):
            raise UserError(problem or "rank 0 could not write the checkpoint; see its message.")
        self.last_ckpt_iter = self.it

    def _write_checkpoint(self, rngs: list, window: dict) -> str | None:
        """Rank 0 writes; returns the sentence for a failed write (disk full, folder gone), else None."""
        epoch, batch = divmod(self.it, self.steps_per_epoch)
        state = {
            "format": checkpoint.FORMAT, "config": self.cfg.to_dict(), "iteration": self.it,
            "epoch": epoch, "batch": batch,
            "model": artifacts.clean_state_dict(self.raw.state_dict()),
            "ema": None if self.ema is None else self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rngs,
            "window": window,
            "wall_s": self.wall_s + self._since_start(), "train_s": self.train_s, "images": self.images,
            "model_meta": self.model_meta(), "data": self.data_digests(),
        }
        path = self.out / checkpoint.NAME
        try:
            checkpoint.save(path, state)
        except OSError as err:
            return (f"could not write the checkpoint '{path}' ({err.strerror or err}); the previous one is "
                    f"intact: free space (or fix the folder) and run the same command again to resume "
                    f"({self._last_good()}).")
        return None

    def _last_good(self) -> str:
        it = self.last_ckpt_iter
        return "no checkpoint was written yet" if it is None else f"last good checkpoint: iteration {it}"

    # --- one step ---------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self.window = {k: torch.zeros((), dtype=torch.float64, device=self.info.device)
                       for k in ("loss", "top1", "top5", "n")}
        self.window_t0 = time.perf_counter()

    def step(self, x: torch.Tensor, y: torch.Tensor, stop: StopSignals) -> bool:
        """One optimisation step at iteration `self.it`; returns True when the run must stop after it."""
        lr = self.schedule.lr(self.it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.info.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.model(x)
        loss = self.criterion(logits.float(), y)
        if os.environ.get(_NAN_ENV) == str(self.it):
            loss = loss * float("nan")
        nonfinite = not bool(torch.isfinite(loss.detach()))
        bad, signalled = distributed.all_sum([float(nonfinite), float(stop.received is not None)], self.info)
        if bad:
            raise UserError(f"the training loss became non-finite at iteration {self.it} (lr {lr:g}); "
                            f"stopped without saving these weights ({self._last_good()}); try a lower lr "
                            f"or precision=fp32 in a new --out folder.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.raw, self.it)
        top1, top5 = _topk_correct(logits.detach(), y)
        n = y.shape[0]
        self.window["loss"] += loss.detach().double() * n
        self.window["top1"] += top1
        self.window["top5"] += top5
        self.window["n"] += n
        self.it += 1
        self.images += n * self.info.world_size
        return bool(signalled)

    # --- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, model: nn.Module | None = None) -> dict:
        """Loss and top-1/top-5 error on a whole split; every sample counted once over all processes.
        `model` defaults to the one the run saves: the averaged weights when EMA is on."""
        if model is None:
            model = self.ema.model if self.ema is not None else self.raw
        distributed.broadcast_buffers(model, self.info)
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.info.device)
        for x, y in self.eval_loaders[split].iter_epoch(0):
            logits = self._eval_logits(model, x)
            top1, top5 = _topk_correct(logits, y)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            sums += torch.stack([loss.double(), top1.double(), top5.double(),
                                 torch.tensor(float(y.shape[0]), dtype=torch.float64, device=sums.device)])
        model.train(was_training)
        loss, c1, c5, n = distributed.all_sum(sums.tolist(), self.info)
        n = max(n, 1.0)
        return {"loss": loss / n, "top1_err": 1 - c1 / n, "top5_err": 1 - c5 / n, "n": int(n)}

    def _eval_logits(self, model: nn.Module, x) -> torch.Tensor:
        """Logits of a batch: a tensor (one view per image) or a multi-view batch with `.logits(fn)`
        (resnet.data.views.ViewBatch), averaged over views; plus the mirror image when tta_flip."""

        def forward(inp: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.info.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = model(inp).float()
                if self.cfg.tta_flip:
                    out = (out + model(inp.flip(3)).float()) / 2
            return out

        return x.logits(forward) if hasattr(x, "logits") else forward(x)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _since_start(self) -> float:
        return time.perf_counter() - self.t_start

    def log_train(self) -> None:
        loss, c1, c5, n = distributed.all_sum([float(self.window[k]) for k in ("loss", "top1", "top5", "n")],
                                              self.info)
        if n == 0:
            return
        dt = time.perf_counter() - self.window_t0
        err = 1 - c1 / n
        self.schedule.observe_train(self.it, err)
        self.log.write({"iter": self.it, "epoch": self.it / self.steps_per_epoch, "split": "train",
                        "loss": loss / n, "top1_err": err, "top5_err": 1 - c5 / n,
                        "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": n / max(dt, 1e-9)})
        self._reset_window()

    def log_eval(self, split: str) -> dict:
        m = self.evaluate(split)
        if split == "val":
            self.schedule.observe_val(self.it, m["top1_err"])
        line = {"iter": self.it, "epoch": self.it / self.steps_per_epoch, "split": split,
                "loss": m["loss"], "top1_err": m["top1_err"], "top5_err": m["top5_err"],
                "lr": self.optimizer.param_groups[0]["lr"], "n": m["n"]}
        if self.ema is not None:  # the trained weights too, so the log shows whether averaging helps
            t = self.evaluate(split, self.raw)
            m["trained_top1_err"] = line["trained_top1_err"] = t["top1_err"]
            line["trained_top5_err"] = t["top5_err"]
        self.log.write(line)
        return m

    # --- the run --------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.info.is_main:
            try:
                print(text, file=sys.stderr, flush=True)
            except BrokenPipeError:
                # Whoever read the messages went away (`2>&1 | head`): the run goes on without them, as
                # metrics.jsonl records the same. Stopping here lost the steps since the last checkpoint.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())

    def fit(self) -> dict:
        """Train from `self.it` to the end (or to a stop signal), then write the final outputs."""
        p = self.plan
        late = [m for m in p.milestones if m >= p.max_iters]
        if self.cfg.schedule == "multistep" and late and self.it == 0:
            self._say(f"note: the lr milestones {late} are not before max_iters {p.max_iters}, so the lr is not "
                      f"divided there; shorten them with the run (milestones=[...]) if that is not meant.")
        self.t_start = time.perf_counter()
        bar = outputs.progress_bar(p.max_iters, self.it, self.info.is_main)
        stop_now = False
        with StopSignals() as stop:
            while self.it < p.max_iters and not stop_now:
                epoch, start = divmod(self.it, self.steps_per_epoch)
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(epoch)
                t0 = time.perf_counter()
                for x, y in self.train_loader.iter_epoch(epoch, start):
                    stop_now = self.step(x, y, stop)
                    self._boundary(bar, t0)
                    t0 = time.perf_counter()
                    if stop_now or self.it >= p.max_iters:
                        break
        bar.close()
        if stop_now:
            self.save_checkpoint()
            self.wall_s += self._since_start()
            self._say(f"stopped by {stop.received or 'a signal on another process'} at iteration {self.it}; "
                      f"checkpoint saved in {self.out}; run the same command again to resume.")
            self._write_curves()
            self.log.close()
            return {"status": "interrupted", "iterations": self.it}
        return self.finish()

    def _boundary(self, bar, t0: float) -> None:
        """After-step work at iteration `self.it`: train log, then evaluation, then checkpoint (this order
        is what makes a resumed metrics log identical to an uninterrupted one)."""
        p, it = self.plan, self.it
        self.train_s += time.perf_counter() - t0
        bar.update(1)
        if it % self.cfg.log_every == 0 or it == p.max_iters:
            self.log_train()
            bar.set_postfix_str(f"{self.images / max(self.train_s, 1e-9):.0f} img/s", refresh=False)
        if (p.eval_every and it % p.eval_every == 0) or it == p.max_iters:
            if "val" in self.eval_loaders:
                m = self.log_eval("val")
                trained = (f" (trained weights {100 * m['trained_top1_err']:.2f}%)"
                           if "trained_top1_err" in m else "")
                self._say(f"iter {it}/{p.max_iters} (epoch {it / self.steps_per_epoch:.1f}): val top-1 error "
                          f"{100 * m['top1_err']:.2f}%{trained}, lr {self.optimizer.param_groups[0]['lr']:g}, "
                          f"{self.images / max(self.train_s, 1e-9):.0f} img/s")
        if it % p.checkpoint_every == 0 or it == p.max_iters:
            self.save_checkpoint()

    def finish(self) -> dict:
        """Test-split evaluation, model artifacts, curves and summary.json (rank 0 writes)."""
        wall = self.wall_s + self._since_start()
        metrics = outputs.read_metrics(self.out / "metrics.jsonl") if self.info.is_main else []
        val = [m for m in metrics if m["split"] == "val"]
        summary = {"status": "finished", "recipe": self.cfg.recipe, "arch": self.cfg.arch,
                   "val_top1_err": val[-1]["top1_err"] if val else None,
                   "val_top5_err": val[-1]["top5_err"] if val else None}
        if val and "trained_top1_err" in val[-1]:
            summary["val_top1_err_trained"] = val[-1]["trained_top1_err"]
        if "test" in self.eval_loaders:
            m = self.log_eval("test")
            summary.update(test_top1_err=m["top1_err"], test_top5_err=m["top5_err"], test_n=m["n"])
            if "trained_top1_err" in m:
                summary["test_top1_err_trained"] = m["trained_top1_err"]
        summary.update(iterations=self.it, epochs=self.it / self.steps_per_epoch, wall_s=wall,
                       train_s=self.train_s, images_per_s=self.images / max(self.train_s, 1e-9),
                       skipped=self._skipped(), world_size=self.info.world_size,
                       device=str(self.info.device), precision=self.cfg.precision)
        if self.info.is_main:
            self._write_artifacts(summary)
            outputs.write_json(self.out / "summary.json", summary)
            self._write_curves()
        self.log.close()
        return summary

    def _skipped(self) -> int:
        """Unreadable images: found when the data was scanned, plus those streamed loaders met on any rank
        (the last counted since this process started)."""
        met = sum(len(getattr(loader, "skipped", [])) for loader in (self.train_loader, *self.eval_loaders.values()))
        return len(getattr(self.ds, "skipped", []) or []) + int(distributed.all_sum([float(met)], self.info)[0])

    def model_meta(self) -> dict:
        """What model.json says about the model (all but its metrics); every checkpoint carries it too, so a
        run that has not finished is evaluated with its own classes, normalisation and view."""
        size = self.ds.image_size
        meta = {"arch": self.cfg.arch, "options": self.model_options, "classes": list(self.ds.classes),
                "mean": self.mean, "std": self.std,
                "input_size": [self.cfg.in_chans, *(size or (224, 224))],
                "eval_view": self.cfg.eval_view or (("flip" if self.cfg.tta_flip else "full") if size
                                                    else "center"),
                "recipe": self.cfg.recipe}
        # What `resnet eval RUN` scores when given no --data: a folder by its absolute path (the run may be
        # evaluated from another working directory), a named source by its name.
        from ..data.dataset import NAMED_SOURCES

        data = self.cfg.data
        meta["data"] = data if data in NAMED_SOURCES else str(Path(data).expanduser().resolve())
        if data in NAMED_SOURCES and self.cfg.data_dir:  # where that source's files were read from
            meta["data_dir"] = str(Path(self.cfg.data_dir).expanduser().resolve())
        if self.cfg.val_size and "val" in self.ds.splits:  # used by `resnet eval --split val` on data without one
            # `images` and `digest` let `resnet eval` tell when the folder changed since: the same seed would
            # then carve other images, some of them trained on.
            meta["val_split"] = {"val_size": self.cfg.val_size, "seed": self.cfg.data_seed}
            digests = self.data_digests()
            if "val" in digests and "train" in digests:
                meta["val_split"].update(images=digests["val"]["images"] + digests["train"]["images"],
                                         digest=digests["val"]["digest"])
        return meta

    def data_digests(self) -> dict:
        """Which files each split of a folder holds (see split_digest); empty for a named source."""
        from ..data.dataset import split_digest

        if self._digests is None:
            self._digests = {}
            for name, sp in self.ds.splits.items():
                digest = split_digest(sp)
                if digest is not None:
                    self._digests[name] = {"images": len(sp), "digest": digest}
        return self._digests

    def _write_artifacts(self, summary: dict) -> None:
        model = self.ema.model if self.ema is not None else self.raw
        meta = {**self.model_meta(),
                "metrics": {k: v for k, v in summary.items() if k.endswith(("_err", "_err_trained"))}}
        artifacts.save_model_artifacts(self.out, model, meta)

    def _write_curves(self) -> None:
        if not self.info.is_main:
            return
        note = outputs.plot_curves(outputs.read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png",
                                   f"{self.cfg.recipe} ({self.cfg.arch})")
        if note:
            self._say(note)


def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, data_api=None) -> dict:
    """Run (or resume, or return the finished summary of) the recipe `cfg` in `out_dir`.

    `data_api` provides `load_dataset` and `make_loader` as in the data contract (default `resnet.data`).
    """
    validate(cfg)
    out = Path(out_dir)
    done = _existing_run(cfg, out)
    if done is not None:
        return done
    if data_api is None:
        from .. import data as data_api
    info = distributed.setup(cfg.device)
    lock = trainer = None
    try:
        problem = None
        if info.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = _lock(out)
                checkpoint.remove_stale_temps(out)  # only now: another live run's temporaries are its own
            except UserError as err:
                problem = str(err)
            except OSError as err:
                problem = f"cannot use '{out}' as the run folder ({err.strerror or err}); choose a writable --out."
        if distributed.any_rank(problem is not None, info):
            raise UserError(problem or "rank 0 could not prepare the run folder; see its message.")
        trainer = Trainer(cfg, out, info, data_api)
        if info.is_main:
            outputs.write_yaml(out / "config.yaml", cfg.to_dict())
            if trainer.log.note:
                trainer._say(trainer.log.note)
            if trainer.it:
                trainer._say(f"resuming {out} from iteration {trainer.it}.")
        return trainer.fit()
    finally:
        if lock is not None:
            lock.close()  # releases the lock
        # DDP's reducer must be freed while its process group lives: freed after destroy_process_group (when
        # train() returned), it intermittently blocked a gloo rank forever.
        trainer = None
        if info.enabled:
            import gc

            gc.collect()
        distributed.teardown()


def _lock(out: Path):
    """An exclusive lock on `out/.lock` for this run's lifetime (released by the kernel if the process dies),
    so a second process (a requeued job whose first copy still runs) cannot interleave writes. None where
    the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    f = open(out / ".lock", "a+")  # noqa: SIM115 - held open until the run ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another training process is using '{out}'; wait for it to end (or stop it), or "
                        f"choose another --out folder.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


_OUTPUTS = ("summary.json", "model.safetensors", checkpoint.NAME, "metrics.jsonl")
# Files a run writes that are not worth resuming from, but are a user's when no config.yaml says a run made them.
_ALSO_WRITTEN = ("model.json", "curves.png")


def _existing_run(cfg: TrainConfig, out: Path) -> dict | None:
    """What `out` already holds: the summary of a finished run with the same settings (never retrained),
    None for a fresh or resumable folder; a folder holding another run's outputs is refused, so they are
    never overwritten, even when its checkpoint has been deleted."""
    held = [name for name in _OUTPUTS if (out / name).exists() and (out / name).stat().st_size]
    if not (out / "config.yaml").exists():
        # Outputs without the config that says what made them are not ours to overwrite; a checkpoint says
        # its own settings, and resuming compares them.
        foreign = held + [name for name in _ALSO_WRITTEN if (out / name).exists()]
        if foreign and checkpoint.NAME not in held:
            raise UserError(f"'{out}' holds {', '.join(foreign)} but no config.yaml saying which run wrote them; "
                            f"choose a new --out folder, or move those files away.")
        return None
    import json

    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError
        old = config_from_dict(saved).to_dict()
    except (UserError, yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        why = f" ({str(err).rstrip('.')})" if isinstance(err, UserError) else ""
        raise UserError(f"'{out}/config.yaml' is not the config of a resnet run{why}; choose a new --out folder, "
                        f"or move that file away.") from None
    new = cfg.to_dict()
    diff = changed_settings(old, new)
    if diff:
        if held:
            raise UserError(f"'{out}' holds a run with different settings ({', '.join(diff[:4])}); use the "
                            f"same recipe and overrides to resume it, or a new --out folder.")
        return None
    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        raise UserError(f"'{path}' is damaged (not a JSON summary); delete it and run the same command again "
                        f"to resume from the checkpoint and write it anew.")
    return summary if summary.get("status") == "finished" else None
