"""Loaders: the paper's augmentations on whole batches, determinism, exact resume, sharding, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnet.data import AugmentConfig, SkippedImageWarning, load_dataset, make_loader
from resnet.data.augment import crop_flip, generator, normalize, pca_lighting, scale_crop_flip
from resnet.data.dataset import MemorySplit
from resnet.errors import UserError

TINY = AugmentConfig(crop=8, resize=10, scale_min=10, scale_max=14, scales=(8, 12))


def memory_split(n=10, c=3, h=6, w=6, seed=0) -> MemorySplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return MemorySplit("train", images, torch.arange(n) % 3)


def test_crop_flip_every_output_is_a_shifted_or_mirrored_window_of_the_padded_image():
    x = torch.randint(0, 256, (64, 3, 5, 7), dtype=torch.uint8)
    out = crop_flip(x, 2, generator(1))
    padded = F.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(64):
        matches = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (0, 1)
            if torch.equal(
                out[i], (lambda win: win.flip(-1) if f else win)(padded[i, :, dy : dy + 5, dx : dx + 7])
            )
        ]
        assert matches, f"sample {i} is not a crop of its padded image"
        seen.add(matches[0][2])
    assert seen == {0, 1}  # both flipped and unflipped samples occur
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_crop_flip_offsets_cover_the_whole_range():
    # Mark the image so the crop offset can be read back: value = 1 + column index, padding stays 0.
    x = (torch.arange(8, dtype=torch.uint8) + 1).expand(400, 1, 8, 8).contiguous()
    out = crop_flip(x, 4, generator(2))
    pad_cols = (out[:, 0] == 0).all(dim=1).sum(1)  # all-zero columns = |horizontal offset - 4|
    pad_rows = (out[:, 0] == 0).all(dim=2).sum(1)
    assert set(pad_cols.tolist()) == set(range(5)) and set(pad_rows.tolist()) == set(range(5))


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    expect = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, mean, std), expect, atol=1e-5)


def test_scale_crop_flip_identity_and_mirror():
    x = torch.rand(6, 3, 8, 8)
    out = scale_crop_flip(x, 8, 8, 8, generator(0))  # shorter side 8, crop 8: the image itself or its mirror
    for i in range(6):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
    bigger = scale_crop_flip(x, 4, 6, 9, generator(0))
    assert bigger.shape == (6, 3, 4, 4)


def test_pca_lighting_adds_one_colour_shift_per_image():
    x = torch.zeros(50, 3, 4, 4)
    out = pca_lighting(x, 0.1, generator(3))
    shift = out[:, :, 0, 0]
    assert torch.allclose(out, shift[:, :, None, None].expand_as(out))
    assert 0.005 < shift.std().item() < 0.1  # alpha std 0.1 times eigenvalues up to 0.2175
    assert torch.equal(pca_lighting(torch.zeros(2, 1, 4, 4), 0.1, generator(3)), torch.zeros(2, 1, 4, 4))


def _epoch(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iter_epoch(epoch, start)]


def test_memory_loader_deterministic_and_resumes_exactly():
    split = memory_split(23)
    kw = dict(train=True, augment="cifar", mean=[0.5] * 3, std=[0.25] * 3, seed=7, cfg=AugmentConfig(pad=2))
    a, b = make_loader(split, 4, **kw), make_loader(split, 4, **kw)
    assert len(a) == 5  # 23 // 4, drop_last for training
    e1, e1_again, e2 = _epoch(a, 1), _epoch(b, 1), _epoch(a, 2)
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(e1, e1_again, strict=True)
    )
    assert not torch.equal(e1[0][0], e2[0][0])
    resumed = _epoch(b, 1, start=3)
    assert len(resumed) == 2 and all(torch.equal(r[0], e[0]) for r, e in zip(resumed, e1[3:], strict=True))
    other_seed = _epoch(make_loader(split, 4, **{**kw, "seed": 8}), 1)
    assert not torch.equal(other_seed[0][0], e1[0][0])


def test_memory_loader_eval_full_view_is_normalised_images_in_order():
    split = memory_split(7)
    loader = make_loader(split, 3, train=False, augment="cifar", mean=[0.5] * 3, std=[0.25] * 3)
    batches = _epoch(loader, 0)
    assert [len(y) for _, y in batches] == [3, 3, 1] and len(loader) == 3
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(x * 0.25 + 0.5, split.images.float() / 255, atol=1e-5)
    assert torch.cat([b[1] for b in batches]).tolist() == split.labels.tolist()


@pytest.mark.parametrize("train", [True, False])
def test_sharding_across_ranks(train):
    n, world = 11, 3
    split = MemorySplit(
        "s",
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
        torch.arange(n),
    )
    kw = dict(
        train=train, augment="none", mean=[0.0], std=[1 / 255], seed=1, world_size=world, drop_last=False
    )
    seen = [
        torch.cat([y for _, y in make_loader(split, 2, rank=r, **kw).iter_epoch(5)]).tolist()
        for r in range(world)
    ]
    if train:  # padded to 12 = 4 per rank; every sample at least once
        assert [len(s) for s in seen] == [4, 4, 4] and set(sum(seen, [])) == set(range(n))
    else:  # disjoint shards, exactly once, no padding
        assert sorted(sum(seen, [])) == list(range(n)) and [len(s) for s in seen] == [4, 4, 3]


def test_memory_imagenet_augment_and_views_on_tiny_images():
    split = memory_split(6, h=12, w=16)
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3, cfg=TINY, augment="imagenet")
    x, _ = next(make_loader(split, 6, train=True, **kw).iter_epoch(0))
    assert x.shape == (6, 3, 8, 8)
    center, _ = next(make_loader(split, 6, train=False, **kw).iter_epoch(0))
    assert center.shape == (6, 3, 8, 8)
    ten, _ = next(make_loader(split, 6, train=False, eval_view="10crop", **kw).iter_epoch(0))
    assert ten.n == 6 and ten.groups[0][0].shape == (60, 3, 8, 8)
    multi, _ = next(make_loader(split, 6, train=False, eval_view="multiscale", **kw).iter_epoch(0))
    assert [g[0].shape for g in multi.groups] == [(12, 3, 8, 11), (12, 3, 12, 16)]


def test_channels_last_and_bad_arguments():
    split = memory_split(4)
    x, _ = next(
        make_loader(split, 4, train=True, mean=[0.5] * 3, std=[0.2] * 3, channels_last=True).iter_epoch(0)
    )
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(UserError, match="unknown augmentation"):
        make_loader(split, 4, train=True, augment="autoaugment", mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(UserError, match="one per channel"):
        make_loader(split, 4, train=True, mean=[0.5], std=[0.2])


# ------------------------------------------------------------------------------------------- stream
def stream_folder(tmp_path, n=6):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (16, 20) if i % 3 else (18, 14)  # two sizes: the folder is streamed
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=95)
    return root


def test_stream_loader_imagenet_deterministic_across_worker_counts_and_resumes(tmp_path):
    ds = load_dataset(stream_folder(tmp_path), cache_dir=tmp_path / "c", workers=1)
    assert ds.kind == "stream"
    kw = dict(train=True, augment="imagenet", mean=ds.mean, std=ds.std, seed=3, cfg=TINY)
    inline = _epoch(make_loader(ds.splits["train"], 2, num_workers=0, **kw), 4)
    pooled = _epoch(make_loader(ds.splits["train"], 2, num_workers=2, **kw), 4)
    assert len(inline) == 3 and inline[0][0].shape == (2, 3, 8, 8)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, pooled, strict=True)
    )
    resumed = _epoch(make_loader(ds.splits["train"], 2, num_workers=0, **kw), 4, start=2)
    assert torch.equal(resumed[0][0], inline[2][0])


def test_a_stream_loader_alive_at_exit_does_not_hang_the_interpreter(tmp_path):
    """The workers ignore SIGTERM (so a scheduler's signal to the process group reaches the trainer alone);
    the interpreter's exit stops workers with SIGTERM, so a loader made at module level hung it for ever."""
    import subprocess
    import sys

    root = stream_folder(tmp_path)
    script = ("import sys\nfrom resnet.data import load_dataset, make_loader\n"
              "ds = load_dataset(sys.argv[1], cache_dir=sys.argv[2])\n"
              "loader = make_loader(ds.splits['train'], 2, train=True, augment='imagenet', mean=ds.mean, "
              "std=ds.std, num_workers=2)\n"
              "print(ds.kind, sum(1 for _ in loader.iter_epoch(0)), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(root), str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["stream", "3"], proc.stderr[-2000:]


def test_stream_eval_views(tmp_path):
    ds = load_dataset(stream_folder(tmp_path), cache_dir=tmp_path / "c", workers=1)
    split = ds.splits["train"]
    kw = dict(train=False, augment="imagenet", mean=ds.mean, std=ds.std, cfg=TINY, num_workers=0)
    center, y = next(make_loader(split, 4, **kw).iter_epoch(0))
    assert center.shape == (4, 3, 8, 8) and y.tolist() == split.labels[:4].tolist()
    ten, _ = next(make_loader(split, 4, eval_view="10crop", **kw).iter_epoch(0))
    assert ten.n == 4 and ten.groups[0][0].shape == (40, 3, 8, 8)
    multi, _ = next(make_loader(split, 4, eval_view="multiscale", **kw).iter_epoch(0))
    assert multi.n == 4 and len(multi.groups) == 8  # per image and scale: sizes differ between images
    assert {min(g[0].shape[-2:]) for g in multi.groups} == {8, 12}
    with pytest.raises(UserError, match="held in memory"):
        make_loader(split, 4, train=True, augment="cifar", mean=ds.mean, std=ds.std)
    with pytest.raises(UserError, match="the flip view needs images of one size"):
        make_loader(split, 4, eval_view="flip", **kw)


def test_flip_view_is_the_same_from_memory_and_from_files(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(1)
    for i in range(5):
        (root / "test" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(root / "test" / f"c{i % 2}" / f"{i}.png")
    batches = {}
    for kind in ("memory", "stream"):
        ds = load_dataset(root, cache_dir=tmp_path / kind, kind=kind, workers=1)
        loader = make_loader(ds.splits["test"], 4, train=False, augment="none", mean=ds.mean, std=ds.std,
                             eval_view="flip", num_workers=0)
        batches[kind] = [x for x, _ in loader.iter_epoch(0)]
    for mem, stream in zip(batches["memory"], batches["stream"], strict=True):
        (views, owner), = mem.groups
        assert views.shape[0] == 2 * mem.n and torch.equal(views[1::2], views[0::2].flip(-1))
        assert owner.tolist() == [i // 2 for i in range(2 * mem.n)]
        assert torch.allclose(stream.groups[0][0], views) and torch.equal(stream.groups[0][1], owner)


def test_stream_file_broken_mid_run_is_skipped_or_strict(tmp_path):
    ds = load_dataset(stream_folder(tmp_path), cache_dir=tmp_path / "c", workers=1)
    split = ds.splits["train"]
    open(split.paths[1], "wb").close()  # the file breaks after the index was built
    kw = dict(train=False, augment="imagenet", mean=ds.mean, std=ds.std, cfg=TINY, num_workers=0)
    loader = make_loader(split, 3, **kw)
    with pytest.warns(SkippedImageWarning):
        sizes = [len(y) for _, y in loader.iter_epoch(0)]
    assert sizes == [2, 3] and loader.skipped == [(split.paths[1], "is an empty file (0 bytes)")]
    with pytest.raises(UserError, match="empty file"):
        list(make_loader(split, 3, strict=True, **kw).iter_epoch(0))


def test_a_training_batch_with_no_readable_image_stops_instead_of_shifting_the_iterations(tmp_path):
    """Skipping such a batch would make the epoch one step short: iteration N would no longer be batch N
    (no exact resume), and on several processes one rank would fall a step behind the others."""
    ds = load_dataset(stream_folder(tmp_path), cache_dir=tmp_path / "c", workers=1)
    split = ds.splits["train"]
    loader = make_loader(split, 2, train=True, augment="imagenet", mean=ds.mean, std=ds.std, seed=3, cfg=TINY,
                         num_workers=0)
    first = split.paths[int(loader.order(0)[0])], split.paths[int(loader.order(0)[1])]
    for path in first:
        open(path, "wb").close()
    with pytest.warns(SkippedImageWarning), pytest.raises(UserError, match="no image of a training batch could be "
                                                            "read.*storage.*run the same command again"):
        next(loader.iter_epoch(0))


def test_batch_work_runs_single_threaded_and_restores_the_callers_threads():
    before = torch.get_num_threads()
    split = memory_split(8)
    loader = make_loader(split, 4, train=True, mean=[0.5] * 3, std=[0.2] * 3)
    for _ in loader.iter_epoch(0):
        assert torch.get_num_threads() == before  # the consumer (the training step) sees its own count
    assert torch.get_num_threads() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_loader_matches_cpu():
    split = memory_split(40, h=8, w=8)
    kw = dict(train=True, augment="cifar", mean=[0.5] * 3, std=[0.25] * 3, seed=5, cfg=AugmentConfig(pad=2))
    cpu = _epoch(make_loader(split, 8, **kw), 3)
    gpu = _epoch(make_loader(split, 8, device="cuda", channels_last=True, **kw), 3)
    assert gpu[0][0].device.type == "cuda" and gpu[0][0].is_contiguous(memory_format=torch.channels_last)
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-5)
    img = memory_split(6, h=12, w=16)
    kwi = dict(train=True, augment="imagenet", mean=[0.5] * 3, std=[0.25] * 3, cfg=TINY)
    xc = next(make_loader(img, 6, **kwi).iter_epoch(0))[0]
    xg = next(make_loader(img, 6, device="cuda", **kwi).iter_epoch(0))[0]
    assert torch.allclose(xc, xg.cpu(), atol=1e-3)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_a_sample_is_augmented_the_same_whatever_the_rank_world_size_or_batch(augment):
    n = 16
    g = torch.Generator().manual_seed(0)
    split = MemorySplit(
        "t", torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n)
    )
    kw = dict(train=True, augment=augment, mean=[0.5] * 3, std=[0.25] * 3, seed=9, cfg=TINY)
    single = _epoch(make_loader(split, 8, **kw), 2)
    ranks = [_epoch(make_loader(split, 4, rank=r, world_size=2, **kw), 2) for r in range(2)]
    for i, (x, y) in enumerate(single):  # the ranks' batch i together are the single-process batch i
        xs = torch.cat([ranks[0][i][0], ranks[1][i][0]])
        ys = torch.cat([ranks[0][i][1], ranks[1][i][1]])
        assert sorted(ys.tolist()) == sorted(y.tolist())
        for label in y.tolist():
            assert torch.allclose(x[y == label], xs[ys == label], atol=1e-6)
