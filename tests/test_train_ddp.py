"""DDP: 2 gloo processes with local batch b train the same network as 1 process with batch 2b, and
evaluation counts every sample exactly once over the ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from resnet.train import load_recipe, train
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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(load_recipe("cifar10-resnet20", OVERRIDES), out, data_api=FakeData(**DATA))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path: Path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    summary = train(load_recipe("cifar10-resnet20", OVERRIDES), single, data_api=FakeData(**DATA))
    threads = torch.get_num_threads()
    mp.spawn(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    torch.set_num_threads(threads)

    a, b = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == b.keys()  # no `module.` prefix reached the file
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)

    ddp_summary = json.loads((ddp / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["test_n"] == summary["test_n"] == 29
    val = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [m["n"] for m in val if m["split"] == "val"] == [37, 37]
    assert ddp_summary["val_top1_err"] == pytest.approx(summary["val_top1_err"], abs=1 / 37 + 1e-9)
