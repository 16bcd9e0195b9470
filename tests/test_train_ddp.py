"""DDP: 2 gloo processes with local batch b train the same network as 1 process with batch 2b, and
evaluation counts every sample exactly once over the ranks."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from resnet.train import checkpoint, load_recipe, train
from test_train_helpers import FakeData, tiny_overrides

# 8 steps of global batch 16; synchronised BN, so batch statistics are over the global batch as in 1 process.
# On FakeData (see test_train_helpers for why not the digits here); odd split sizes, so an evaluation that
# padded or dropped samples would show in `n`.
OVERRIDES = tiny_overrides(max_iters=8, milestones=[6], eval_every=4, checkpoint_every=4, sync_bn=True,
                           threads=1, in_chans=3)
DATA = dict(n_train=256, n_val=37, n_test=29)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, overrides: list[str] = OVERRIDES,
            stop_at: int | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if stop_at is not None:  # as if SIGTERM reached the ranks during step `stop_at`
        from resnet.train import loop

        step = loop.Trainer.step
        loop.Trainer.step = lambda self, x, y, stop: step(self, x, y, stop) or self.it == stop_at
    train(load_recipe("cifar10-resnet20", overrides), out, data_api=FakeData(**DATA))


def _spawn(out: Path, overrides: list[str] = OVERRIDES, stop_at: int | None = None, limit_s: float = 300) -> None:
    """Two ranks training into `out`; a hang (the ranks waiting on each other) fails the test, not the CI job."""
    threads = torch.get_num_threads()
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(out), overrides, stop_at), nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process run into {out} did not end within {limit_s:.0f} s")
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path: Path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    summary = train(load_recipe("cifar10-resnet20", OVERRIDES), single, data_api=FakeData(**DATA))
    _spawn(ddp)

    a, b = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == b.keys()  # no `module.` prefix reached the file
    # Equal to fp32 rounding: one batch of 16 and two of 8 plus an all-reduce sum in different orders, and
    # 8 steps through BN grow those differences. Per tensor, |b - a| / |a| was at most 1.0e-4 on an AMX Xeon
    # (elementwise, a near-zero weight can differ by more than rtol 1e-4 allows), against 1.5 when the
    # ranks do not synchronise BN: the bound 1e-3 keeps a margin of 10 on each side.
    for key in a:
        assert b[key].shape == a[key].shape, key
        err = float((b[key].double() - a[key].double()).norm() / a[key].double().norm().clamp_min(1e-12))
        assert err < 1e-3, f"{key}: relative difference {err:.2e}"

    ddp_summary = json.loads((ddp / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["test_n"] == summary["test_n"] == 29
    val = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [m["n"] for m in val if m["split"] == "val"] == [37, 37]
    assert ddp_summary["val_top1_err"] == pytest.approx(summary["val_top1_err"], abs=1 / 37 + 1e-9)


# Per-rank BN statistics (no sync_bn), and a stop in the middle of a training-log window (logs every 3).
PER_RANK_BN = tiny_overrides(max_iters=8, milestones=[6], eval_every=4, checkpoint_every=4, log_every=3,
                             threads=1, in_chans=3)


@pytest.mark.slow
def test_two_processes_stopped_mid_window_resume_bit_for_bit_and_score_the_saved_model(tmp_path: Path):
    """A resumed 2-process run equals the uninterrupted one (every log line, every weight): the partial
    training-metrics window is saved summed over the ranks (it was rank 0's, loaded into both). And the
    validation figures are those of the saved model: each rank evaluates with rank 0's BN statistics."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _spawn(whole, PER_RANK_BN)
    _spawn(resumed, PER_RANK_BN, stop_at=5)
    assert checkpoint.load(resumed / checkpoint.NAME)["iteration"] == 5
    assert not (resumed / "summary.json").exists()
    _spawn(resumed, PER_RANK_BN)
    lines = [(resumed / "metrics.jsonl").read_text(), (whole / "metrics.jsonl").read_text()]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in t.splitlines()]
             for t in lines]
    assert strip[0] == strip[1] and [m["iter"] for m in strip[0] if m["split"] == "train"] == [3, 6, 8]
    a, b = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)

    # The last validation line, recomputed in one process from model.safetensors.
    from resnet.models import create_model

    model = create_model("resnet20", num_classes=4, in_chans=3)
    model.load_state_dict(b)
    model.eval()
    data = FakeData(**DATA)
    ds = data.load_dataset("fake")
    loader = data.make_loader(ds.splits["val"], 64, train=False, mean=ds.mean, std=ds.std)
    with torch.no_grad():
        loss = sum(float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
                   for x, y in loader.iter_epoch(0))
    last_val = [m for m in strip[1] if m["split"] == "val"][-1]
    assert last_val["n"] == 37 and last_val["loss"] == pytest.approx(loss / 37, rel=1e-5)


def test_world_size_without_a_rendezvous_address_is_one_sentence(monkeypatch):
    """WORLD_SIZE=2 set by hand, without torchrun's MASTER_ADDR, ended in torch's ValueError traceback."""
    from resnet.errors import UserError
    from resnet.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match="WORLD_SIZE=2 is set but MASTER_ADDR not; launch with torchrun"):
        distributed.setup("cpu")
