"""Data-path throughput, one JSON line per figure (not part of the test run).

Figures, all measured in this one process run (the machine is noisy; compare ratios, not absolutes):
  machine                 cores, CPU model, clock, torch version and threads, load average
  decode_first_time       ImageFolder -> uint8 cache, fresh temp cache (scan + decode pool + stats), images/s
  load_cached             the same folder again: fingerprint + memory-map, seconds
  memory_cifar_augment    in-memory CIFAR path, pad 4 + random crop 32 + flip + normalise, batch 128, images/s
  reference_per_sample    what a typical user writes: per-sample crop/flip in a Dataset + DataLoader, images/s
  resnet20_train_step     ResNet-20, SGD, batch 128, fp32 eager, fed by the loader: images/s a step consumes
  data_vs_train_ratio     loader images/s / step images/s, timed alternately in that same loop
                          (target >= 20: data <= 5% of a step)
  stream_imagenet_augment streaming JPEGs, shorter side in [256, 480], crop 224, flip, PCA colour, images/s
  jpeg_draft_decode       a 1600x1200 JPEG to shorter side 256: full decode + resize vs draft mode, images/s

Usage: python benchmarks/data.py [--folder ../shared/data/cifar10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import machine
from resnet.data import load_dataset, make_loader
from resnet.data.decode import decode_image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = ROOT.parent / "shared" / "data" / "cifar10"


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def timed_batches(loader, epochs: int = 1, limit: int | None = None) -> tuple[int, float]:
    n, start, batches = 0, time.perf_counter(), 0
    for epoch in range(epochs):
        for x, _ in loader.iter_epoch(epoch):
            n += x.shape[0]
            batches += 1
            if limit is not None and batches >= limit:
                return n, time.perf_counter() - start
    return n, time.perf_counter() - start


class _PerSampleCifar(torch.utils.data.Dataset):
    """The reference: one image at a time, pad + random crop + flip + normalise in __getitem__."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.nn.functional.pad(self.images[i].float() / 255, (4, 4, 4, 4))
        top, left = np.random.randint(0, 9, 2)
        x = x[:, top:top + 32, left:left + 32]
        if np.random.rand() < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def interleaved_rates(loader, steps: int = 12, warmup: int = 3) -> tuple[float, float]:
    """(data images/s, training-step images/s) of ResNet-20 + SGD fed by `loader`, timed alternately batch
    by batch so that both see the same machine load."""
    import resnet

    model = resnet.create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = loader.iter_epoch(7)
    data_s = step_s = 0.0
    images = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            data_s, step_s, images = data_s + t1 - t0, step_s + t2 - t1, images + x.shape[0]
    return images / data_s, images / step_s


def draft_figures(tmp: Path, reps: int) -> None:
    from PIL import Image

    from resnet.data.loader import _resize_shorter_np

    rng = np.random.default_rng(0)
    # A photo-like 1600x1200 JPEG: smooth gradients plus noise (JPEG cost depends little on content).
    yy, xx = np.mgrid[0:1200, 0:1600]
    base = np.stack([xx / 1600 * 255, yy / 1200 * 255, (xx + yy) / 2800 * 255], -1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path = tmp / "big.jpg"
    Image.fromarray(img).save(path, quality=90)
    rates = {}
    for name, draft in (("full", None), ("draft", (256, 256))):
        decode_image(path, draft_size=draft)
        start = time.perf_counter()
        for _ in range(reps):
            _resize_shorter_np(decode_image(path, draft_size=draft), 256)
        rates[name] = reps / (time.perf_counter() - start)
    emit("jpeg_draft_decode", rates["draft"], "images/s", full_decode_images_s=round(rates["full"], 2),
         speedup=round(rates["draft"] / rates["full"], 2), image="1600x1200 JPEG q90 -> shorter side 256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER))
    parser.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "train").is_dir():
        print(f"benchmarks/data.py: no ImageFolder at {folder}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    info = machine()
    print(json.dumps({"figure": "machine", **info}), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="resnet-bench-"))
    try:
        start = time.perf_counter()
        ds = load_dataset(folder, cache_dir=tmp / "cache", val_size=5000)
        first = time.perf_counter() - start
        n_images = sum(len(s) for s in ds.splits.values())
        emit("decode_first_time", n_images / first, "images/s", seconds=round(first, 2), images=n_images,
             skipped=len(ds.skipped), classes=len(ds.classes), workers=info["cores"], folder=str(folder))
        start = time.perf_counter()
        ds = load_dataset(folder, cache_dir=tmp / "cache", val_size=5000)
        emit("load_cached", time.perf_counter() - start, "s", images=n_images)

        train = ds.splits["train"]
        loader = make_loader(train, 128, train=True, augment="cifar", mean=ds.mean, std=ds.std)
        timed_batches(loader, limit=5)  # warm-up
        n, secs = timed_batches(loader, epochs=1, limit=60 if args.quick else None)
        mem_rate = n / secs
        emit("memory_cifar_augment", mem_rate, "images/s", batch=128, images=n, seconds=round(secs, 2))

        ref = torch.utils.data.DataLoader(_PerSampleCifar(train.images, train.labels, ds.mean, ds.std),
                                          batch_size=128, shuffle=True, num_workers=info["cores"],
                                          drop_last=True)
        n, start = 0, time.perf_counter()
        for i, (x, _) in enumerate(ref):
            n += x.shape[0]
            if i >= (20 if args.quick else 80):
                break
        ref_rate = n / (time.perf_counter() - start)
        emit("reference_per_sample", ref_rate, "images/s", batch=128, workers=info["cores"],
             ours_over_reference=round(mem_rate / ref_rate, 2))

        data_rate, step_rate = interleaved_rates(loader, steps=5 if args.quick else 12)
        emit("resnet20_train_step", step_rate, "images/s", batch=128, optimizer="SGD", precision="fp32",
             data_images_s_same_loop=round(data_rate, 1))
        emit("data_vs_train_ratio", data_rate / step_rate, "x", target=20,
             data_share_of_step=round(step_rate / (data_rate + step_rate), 4),
             note="data and step timed alternately, batch by batch, in one loop")

        sds = load_dataset(folder, cache_dir=tmp / "cache", kind="stream")
        sloader = make_loader(sds.splits["train"], 128, train=True, augment="imagenet", mean=sds.mean,
                              std=sds.std, num_workers=info["cores"])
        timed_batches(sloader, limit=2)
        n, secs = timed_batches(sloader, limit=5 if args.quick else 20)
        emit("stream_imagenet_augment", n / secs, "images/s", batch=128, crop=224, scale=[256, 480],
             workers=info["cores"], note="32x32 JPEGs upsampled: measures decode + resize + crop per file")
        draft_figures(tmp, reps=5 if args.quick else 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
