"""Shared settings for the training tests (a few steps of ResNet-20 on the embedded 8x8 digits, the real
data path of resnet.data), a tiny synthetic data source, and unit tests of the schedule and the batch plan.

`FakeData` meets the data contract (docs/contracts.md, "Data") with 3x8x8 noisy class prototypes. The DDP
test uses it because early training on the digits is ill-conditioned: a one-ulp difference (1 vs 2
threads in a single process) grows about 40x per step, so no fp32 tolerance can compare two set-ups
there after several steps. Its loader shuffles with a generator seeded by (seed, epoch), gives rank r
every world-th sample of that order (so the union of the ranks' batch i is the single-process batch i),
and flips each sample by a coin drawn per (epoch, sample) -- the same image whichever rank sees it.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from resnet.errors import UserError
from resnet.train.config import load_recipe
from resnet.train.loop import make_plan
from resnet.train.schedule import LRSchedule


def _images(n: int, classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % classes
    protos = torch.rand(classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, size, size, generator=g)
    images = (0.6 * protos[labels] + 0.4 * noise) * 255
    return images.round().to(torch.uint8), labels.long()


class FakeLoader:
    def __init__(self, split, batch_size, *, train, mean, std, seed=0, rank=0, world_size=1, drop_last=None,
                 device="cpu", channels_last=False, **_):
        self.split, self.batch, self.train, self.seed = split, batch_size, train, seed
        self.rank, self.world = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def _indices(self, epoch: int) -> torch.Tensor:
        n = len(self.split.labels)
        if not self.train:
            return torch.arange(n)[self.rank::self.world]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        per_rank = n // self.world
        return order[: per_rank * self.world][self.rank::self.world]

    def __len__(self) -> int:
        n = len(self._indices(0))
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def iter_epoch(self, epoch: int, start_batch: int = 0):
        idx = self._indices(epoch)
        flips = torch.rand(len(self.split.labels), generator=torch.Generator().manual_seed(epoch + 7)) < 0.5
        for b in range(start_batch, len(self)):
            sel = idx[b * self.batch:(b + 1) * self.batch]
            x = self.split.images[sel].float() / 255
            if self.train:
                x = torch.where(flips[sel].view(-1, 1, 1, 1), x.flip(3), x)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.split.labels[sel]


class FakeData:
    """`load_dataset` / `make_loader` over synthetic 3x8x8 images of `classes` classes."""

    def __init__(self, n_train: int = 256, n_val: int = 64, n_test: int = 64, classes: int = 4,
                 size: int = 8):
        self.sizes = (n_train, n_val, n_test)
        self.classes, self.size = classes, size

    def load_dataset(self, data, **_):
        splits = {}
        for i, (name, n) in enumerate(zip(("train", "val", "test"), self.sizes, strict=True)):
            images, labels = _images(n, self.classes, self.size, seed=i)
            splits[name] = SimpleNamespace(images=images, labels=labels)
        return SimpleNamespace(name="fake", classes=[f"c{i}" for i in range(self.classes)], kind="memory",
                               splits=splits, skipped=[], mean=[0.5] * 3, std=[0.25] * 3,
                               image_size=(self.size, self.size))

    def make_loader(self, split, batch_size, **kwargs):
        return FakeLoader(split, batch_size, **kwargs)


def tiny_overrides(**extra) -> list[str]:
    """Overrides for a few steps of the smallest registered net (resnet20) on the 8x8 digits."""
    base = {"data": "digits", "in_chans": 1, "val_size": 96, "arch": "resnet20", "batch_size": 16,
            "ref_batch_size": 16, "lr": 0.05, "max_iters": 12, "milestones": [8], "eval_every": 6, "log_every": 1,
            "checkpoint_every": 3, "threads": 1, "eval_batch_size": 128}
    base.update(extra)
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in base.items()]


# --- unit tests of the schedule and the batch plan -------------------------------------------------


def test_multistep_divides_at_milestones():
    s = LRSchedule("multistep", 0.1, 100, milestones=[32, 48])
    assert [s.lr(i) for i in (0, 31, 32, 47, 48, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_a_ramp_comes_before_every_schedule():
    """ramp_iters was applied by cosine and onecycle only: with multistep or plateau it was silently ignored."""
    s = LRSchedule("multistep", 0.1, 100, milestones=[5, 50], ramp_iters=10)
    assert [s.lr(i) for i in (0, 4, 5, 9, 10, 50)] == pytest.approx([0.01, 0.05, 0.006, 0.01, 0.01, 0.001])
    p = LRSchedule("plateau", 0.1, 100, ramp_iters=4)
    assert [p.lr(i) for i in (0, 3, 4)] == pytest.approx([0.025, 0.1, 0.1])
    with pytest.raises(UserError, match=r"'ramp_iters' \(40\) must be below max_iters \(40\)"):
        load_recipe("quickstart", ["ramp_iters=40", "max_iters=40"])


def test_warmup_holds_until_training_error_is_low_then_returns_to_base():
    s = LRSchedule("multistep", 0.1, 100, milestones=[50], warmup_lr=0.01, warmup_until_train_err=0.8)
    assert s.lr(0) == 0.01
    s.observe_train(10, 0.85)
    assert s.lr(11) == 0.01
    s.observe_train(20, 0.79)
    assert s.lr(21) == 0.1 and s.state["warmup_end"] == 20
    assert s.lr(60) == pytest.approx(0.01)


def test_plateau_divides_after_patience_and_state_round_trips():
    s = LRSchedule("plateau", 0.1, 1000, plateau_patience=2, plateau_threshold=0.01)
    for err in (0.5, 0.4, 0.399, 0.398):
        s.observe_val(0, err)
    assert s.lr(0) == pytest.approx(0.01)
    t = LRSchedule("plateau", 0.1, 1000, plateau_patience=2)
    t.load_state_dict(s.state_dict())
    assert t.lr(0) == s.lr(0)


def test_onecycle_and_cosine_ramp_then_reach_zero():
    for kind in ("onecycle", "cosine"):
        s = LRSchedule(kind, 0.2, 100, ramp_iters=10)
        assert s.lr(0) == pytest.approx(0.02) and s.lr(9) == pytest.approx(0.2)
        assert s.lr(100) == pytest.approx(0.0, abs=1e-12)
        assert s.lr(50) < 0.2


def test_plan_scales_lr_and_iterations_linearly_with_batch():
    cfg = load_recipe("cifar10-resnet20", ["batch_size=512", "warmup_lr=0.01", "min_lr=0.001"])
    p = make_plan(cfg, world_size=4)
    assert p.local_batch == 128 and p.lr == pytest.approx(0.4)
    assert p.warmup_lr == pytest.approx(0.04) and p.min_lr == pytest.approx(0.004)  # every lr scales
    assert p.max_iters == 16000 and p.milestones == [8000, 12000]
    with pytest.raises(UserError, match="split evenly"):
        make_plan(cfg, world_size=3)


def test_ema_averages_weights_and_bn_statistics_and_copies_the_step_count():
    from resnet.train.loop import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    ema = EMA(net, decay=0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(4, 2, 5, 5) * 3 + 2)  # moves running_mean/var, counts one BN step
    ema.update(net, step=1000)  # past the ramp: decay 0.9
    got, new = ema.model.state_dict(), net.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(got[key], 0.9 * start[key] + 0.1 * new[key], msg=key)
        assert not torch.equal(got[key], new[key]), key
    assert int(got["1.num_batches_tracked"]) == int(new["1.num_batches_tracked"]) == 1


def test_an_event_file_from_the_future_is_not_waited_for(tmp_path):
    """A TensorBoard file stamped an hour ahead (another node's clock) held the run for that hour, silently;
    one stamped this second is still waited out (a restart within the same second)."""
    import time

    from resnet.train.outputs import _after_existing_event_files

    (tmp_path / f"events.out.tfevents.{int(time.time()) + 3600}.otherhost.1.0").touch()
    t0 = time.perf_counter()
    _after_existing_event_files(tmp_path)
    assert time.perf_counter() - t0 < 0.5
    for p in tmp_path.iterdir():
        p.unlink()
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.1.0").touch()
    _after_existing_event_files(tmp_path)
    assert int(time.time()) > now
