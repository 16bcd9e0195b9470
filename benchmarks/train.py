"""CPU training throughput of ResNet-20 on CIFAR-10, data included: our loop vs what a typical user writes.

- reference: eager fp32 NCHW PyTorch, per-sample pad-crop-flip and normalisation in a torch DataLoader
  (2 worker processes, shuffle, batch 128), SGD momentum 0.9, cross-entropy -- written out below;
- ours: `resnet.train.loop.Trainer.step` (the training loop's own step body) fed by `resnet.data`'s
  batch-level augmentation, in several settings (fp32 NCHW, fp32 channels_last, bf16, torch.compile).

Same images for both (the 45k training split of ../shared/data/cifar10, decoded once by resnet.data into
memory), batch 128. Methods run in interleaved rounds (ref, ours..., ref, ...) so load from other processes
hits all alike; each figure is the median over rounds of images/s in a window of steps. Before each window the
benchmark sleeps `--settle` seconds: after the reference's window its DataLoader workers go on refilling their
prefetch queue (4 batches, ~10 ms of one core each on the AVX2 VM), and without the pause that work, and any
threads still spinning, ran inside the next method's window. `vs_reference_paired`, the figure to quote, is
the median over rounds of each round's ratio (this method's window over the reference's window of the same
round); `vs_reference` is the ratio of the medians. On the 2-core AVX2 VM single steps of one method ranged
270-490 ms within a minute, and with windows of 8 steps and 5 rounds the ratio of medians ranged 1.09-1.42x
over seven runs of one morning; short windows (2 steps) in many rounds (40), compared pair by pair, gave 1.21,
1.25 and 1.22x in three runs. The settle pause lets the reference start each window with its prefetch queue
full, so its data work is partly outside its windows: that flatters the reference by up to ~3% (~10 ms of data
work per ~380 ms step), never us. On CPUs without native bf16 (AVX512_BF16, AMX) the bf16 variant is emulated
and over 10x slower; it is left out there unless `--with-emulated-bf16`.

Our loop sets glibc's malloc to keep freed memory (`resnet.machine.keep_freed_memory`, no page faults for
each step's buffers). That setting is process-wide, so the reference, timed in the same process, runs with
it too (`malloc_kept` in each line): the ratio leaves out what it gains, which docs/results.md measured
across processes. `--malloc default` leaves glibc as a plain script has it, for every method (our loop's
call is skipped).

Fraction of peak: training FLOPs per image = 3 x forward FLOPs = 3 x 2 x multiply-adds
(resnet.complexity), over the nominal FP32 peak (cores x 32 or 64 FLOP/cycle x reported clock) and over the
FMA peak measured now (benchmarks/common.py). Prints one JSON line per figure.
Run: python benchmarks/train.py [--rounds N] [--settle S]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common import add_malloc_option, apply_malloc_option, fractions, machine, paired_ratio
from resnet import create_model
from resnet.complexity import model_cost
from resnet.machine import has_native_bf16
from resnet.train.config import load_recipe
from resnet.train.distributed import DistInfo
from resnet.train.loop import StopSignals, Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
BATCH = 128
VARIANTS = {  # name -> overrides of the cifar10-resnet20 recipe
    "ours fp32 NCHW": ["channels_last=false"],
    "ours fp32 channels_last": ["channels_last=true"],  # the recipes' default
    "ours bf16 channels_last": ["channels_last=true", "precision=bf16"],
    "ours compile channels_last": ["channels_last=true", "compile=true"],
}


def load_images():
    """The dataset object (contract of resnet.data) for CIFAR-10 from the shared folder."""
    from resnet.data import load_dataset

    if not DATA.is_dir():
        raise SystemExit(f"no CIFAR-10 folder at {DATA}; this benchmark reads the real images")
    return load_dataset(str(DATA), val_size=5000, seed=0)


class PerSampleCifar(torch.utils.data.Dataset):
    """The reference's dataset: one image at a time, as torchvision-style transforms would do it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).float().div(255)
        x = F.pad(x, (4, 4, 4, 4))
        top, left = random.randint(0, 8), random.randint(0, 8)
        x = x[:, top:top + 32, left:left + 32]
        if random.random() < 0.5:
            x = x.flip(2)
        return (x - self.mean) / self.std, int(self.labels[i])


class Reference:
    """Eager fp32 NCHW training with a DataLoader of per-sample augmentation."""

    def __init__(self, ds):
        split = ds.splits["train"]
        images = split.images.numpy() if hasattr(split.images, "numpy") else np.asarray(split.images)
        data = PerSampleCifar(images, split.labels.numpy(), ds.mean, ds.std)
        self.loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=2,
                                                  drop_last=True, persistent_workers=True)
        self.it = iter(self.loader)
        torch.manual_seed(0)
        self.model = create_model("resnet20")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(self) -> None:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x, y = next(self.it)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


class Ours:
    """The training loop's step on resnet.data batches, under one set of recipe overrides."""

    def __init__(self, ds, overrides: list[str], out: Path):
        import resnet.data as data

        api = SimpleNamespace(load_dataset=lambda *a, **k: ds, make_loader=data.make_loader)
        cfg = load_recipe("cifar10-resnet20", ["data=cifar10-folder", *overrides])
        self.trainer = Trainer(cfg, out, DistInfo(), api)
        self.stop = StopSignals()
        self.epoch = 0
        self.batches = self.trainer.train_loader.iter_epoch(0)

    def step(self) -> None:
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = self.trainer.train_loader.iter_epoch(self.epoch)
            x, y = next(self.batches)
        self.trainer.step(x, y, self.stop)


def timed(method, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        method.step()
    return steps * BATCH / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed windows per method")
    parser.add_argument("--steps", type=int, default=2, help="training steps per window")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per method first")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. compile)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds of idle time before each window")
    parser.add_argument("--with-emulated-bf16", action="store_true",
                        help="time the bf16 variant also on a CPU that emulates bf16 (over 10x slower)")
    add_malloc_option(parser)
    args = parser.parse_args()
    info = machine()
    kept = apply_malloc_option(args.malloc)  # what our loop does first; in force for every method from here on
    skip = list(args.skip)
    if not has_native_bf16() and not args.with_emulated_bf16:
        skip.append("bf16")
        print("note: this CPU emulates bf16 (no AVX512_BF16 or AMX); the bf16 variant is left out "
              "(--with-emulated-bf16 times it).", file=sys.stderr)
    ds = load_images()
    flops_per_image = 3 * 2 * model_cost("resnet20")["macs"]
    with tempfile.TemporaryDirectory() as tmp:
        methods = {"reference": Reference(ds)}
        for name, overrides in VARIANTS.items():
            if not any(s in name for s in skip):
                methods[name] = Ours(ds, overrides, Path(tmp) / name.replace(" ", "_"))
        for m in methods.values():
            for _ in range(args.warmup):
                m.step()
        rates = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, m in methods.items():
                time.sleep(args.settle)
                rates[name].append(timed(m, args.steps))
    ref = statistics.median(rates["reference"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(json.dumps({
            "bench": "train_resnet20_cifar10", "method": name, "images_per_s": round(rate, 1),
            "vs_reference": round(rate / ref, 3), "vs_reference_paired": paired_ratio(values, rates["reference"]),
            **fractions(rate * flops_per_image / 1e9, info),
            "windows_images_per_s": [round(v, 1) for v in values], "batch": BATCH, "steps_per_window": args.steps,
            "train_flops_per_image": flops_per_image, "malloc_kept": kept, "settle_s": args.settle, **info}))


if __name__ == "__main__":
    main()
