"""ImageFolder sources: scanning rules, the decode cache, bad files, the streaming index, the val carve."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet.data import SkippedImageWarning, load_dataset
from resnet.data import cache as cache_mod
from resnet.data.folder import scan_folder
from resnet.errors import UserError

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def pixel(label: int, k: int) -> np.ndarray:
    """A flat-colour 3 x 6 x 6 image whose colour encodes (label, k); PNG keeps it exact."""
    return np.full((6, 6, 3), (label * 40 + 10, k * 7 + 3, 200), dtype=np.uint8)


def make_folder(root: Path, spec: dict[str, dict[str, int]], size=(6, 6)) -> Path:
    for split, classes in spec.items():
        for ci, (name, count) in enumerate(sorted(classes.items())):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                arr = np.full((*size, 3), (ci * 40 + 10, k * 7 + 3, 200), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k:03d}.png")
    return root


def test_scan_sorts_classes_and_ignores_hidden_and_non_images(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"zebra": 2, "ant": 3}, "val": {"ant": 1}})
    (root / "train" / ".cache").mkdir()
    Image.fromarray(pixel(0, 0)).save(root / "train" / ".cache" / "x.png")
    Image.fromarray(pixel(0, 0)).save(root / "train" / "ant" / ".hidden.png")
    (root / "train" / "ant" / "notes.txt").write_text("hi")
    (root / "train" / "README.md").write_text("hi")
    classes, splits = scan_folder(root)
    assert classes == ["ant", "zebra"] and sorted(splits) == ["train", "val"]
    assert splits["train"].labels == [0, 0, 0, 1, 1] and splits["val"].labels == [0]
    assert all(".hidden" not in p and ".cache" not in p for p in splits["train"].paths)


def test_scan_follows_a_linked_folder_once_and_reads_names_that_are_not_utf8(tmp_path):
    """A link back up the tree (train/a/self -> .) used to be followed until the OS refused (the images
    counted ~40 times, then a traceback); a Latin-1 file name crashed the cache fingerprint."""
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 1}})
    (root / "train" / "a" / "self").symlink_to(".")
    (root / "train" / "a" / "up").symlink_to("..")  # the split folder: would pull b's images into a
    Image.fromarray(pixel(0, 5)).save(os.fsdecode(os.fsencode(str(root / "train" / "a")) + b"/caf\xe9.png"))
    classes, splits = scan_folder(root)
    assert classes == ["a", "b"] and splits["train"].labels == [0, 0, 0, 1]
    ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1)
    assert len(ds.splits["train"]) == 4 and len(splits["train"].fingerprint()) == 64


def test_an_unwritable_cache_folder_is_one_sentence(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 1}})
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with pytest.raises(UserError, match="cannot write the decode cache in .*file.*--cache-dir"):
        load_dataset(root, cache_dir=tmp_path / "file" / "cache")


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "does not exist"),
        ("a_file", "is a file, not a folder"),
        ("no_split", "no train, val or test folder"),
        ("empty_split", "has no class folders"),
        ("empty_class", "holds no images"),
        ("val_extra_class", "classes that train lacks"),
    ],
)
def test_scan_errors_are_one_sentence(tmp_path, case, words):
    root = tmp_path / "d"
    if case == "no_split":
        make_folder(tmp_path / "x", {"train": {"cat": 1}})
        (tmp_path / "x" / "train").rename(root)  # ROOT/<class>/<image>: a split level is missing
    elif case == "empty_split":
        make_folder(root, {"train": {"cat": 1}})
        (root / "val").mkdir()
    elif case == "empty_class":
        make_folder(root, {"train": {"cat": 1}})
        (root / "train" / "dog").mkdir()
        (root / "train" / "dog" / ".DS_Store").write_text("")
    elif case == "val_extra_class":
        make_folder(root, {"train": {"cat": 1}, "val": {"dog": 1}})
    elif case == "a_file":
        root.write_bytes(b"an image given where the folder goes")
    with pytest.raises(UserError, match=words) as err:
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_a_folder_named_like_a_built_in_source_is_pointed_out(tmp_path, monkeypatch):
    """`resnet data cifar10` beside a folder ./cifar10 reads the built-in set; it now says how to read the folder."""
    make_folder(tmp_path / "digits", {"train": {"a": 1}})
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"'digits' names the built-in digits set, not the folder ./digits here; "
                                         r"to read the folder, give its path: ./digits"):
        ds = load_dataset("digits")
    assert len(ds.classes) == 10
    assert load_dataset("./digits", cache_dir=tmp_path / "c").classes == ["a"]


def test_memory_path_decodes_exactly_and_caches(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}})
    cache = tmp_path / "cache"
    ds = load_dataset(root, cache_dir=cache, workers=1)
    assert ds.kind == "memory" and ds.classes == ["a", "b"] and ds.image_size == (6, 6)
    train = ds.splits["train"]
    assert train.images.shape == (5, 3, 6, 6) and train.labels.tolist() == [0, 0, 0, 1, 1]
    assert tuple(train.images[4, :, 0, 0].tolist()) == tuple(pixel(1, 1)[0, 0])
    assert not any(p.suffix in (".npy", ".json") for p in root.rglob("*"))  # nothing written into the data
    npys = sorted(cache.glob("*.npy"))
    assert len(npys) == 2  # one per split
    stamp = [p.stat().st_mtime_ns for p in npys]
    again = load_dataset(root, cache_dir=cache, workers=1)
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.npy"))] == stamp  # read, not rebuilt
    assert np.array_equal(again.splits["train"].images.numpy(), train.images.numpy())
    # A changed folder is decoded again, and the stale cache of that split is removed.
    Image.fromarray(pixel(1, 9)).save(root / "train" / "b" / "new.png")
    third = load_dataset(root, cache_dir=cache, workers=1)
    assert len(third.splits["train"]) == 6 and len(list(cache.glob("*.npy"))) == 2


def test_a_cache_file_with_a_damaged_header_is_decoded_again(tmp_path):
    """Its size still matched the record, so every later run died in np.load with a traceback."""
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    cache = tmp_path / "cache"
    first = load_dataset(root, cache_dir=cache, workers=1).splits["train"].images.numpy().copy()
    (npy,) = cache.glob("*.npy")
    with open(npy, "r+b") as f:
        f.write(b"\0" * 16)  # the magic string and version: np.load refuses the file
    again = load_dataset(root, cache_dir=cache, workers=1)
    assert np.array_equal(again.splits["train"].images.numpy(), first)
    assert np.load(npy).shape == first.shape  # rewritten whole


def test_a_file_replaced_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    # cp -p, rsync -t and tar set the mtime back: size and mtime alone would serve the old pixels.
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    cache = tmp_path / "cache"
    first = load_dataset(root, cache_dir=cache, workers=1)
    target = root / "train" / "b" / "000.png"
    old = target.stat()
    replacement = tmp_path / "other.png"
    Image.fromarray(pixel(1, 5)).save(replacement)  # same flat image size, other colour
    assert replacement.stat().st_size == old.st_size
    os.replace(replacement, target)
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again = load_dataset(root, cache_dir=cache, workers=1)
    assert tuple(first.splits["train"].images[2, :, 0, 0].tolist()) == tuple(pixel(1, 0)[0, 0])
    assert tuple(again.splits["train"].images[2, :, 0, 0].tolist()) == tuple(pixel(1, 5)[0, 0])


def test_mean_std_per_channel_from_train(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1)
    imgs = ds.splits["train"].images.numpy().astype(np.float64) / 255
    assert np.allclose(ds.mean, imgs.mean(axis=(0, 2, 3)))
    assert np.allclose(ds.std, np.maximum(imgs.std(axis=(0, 2, 3)), 1 / 255))  # channel 2 is constant
    assert ds.std[0] > 0.05 and ds.std[1] > 0.01


def test_cache_inside_data_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 1}})
    with pytest.raises(UserError, match="inside the data folder"):
        load_dataset(root, cache_dir=root / "cache")


def _zoo(root: Path) -> None:
    d = root / "train" / "a"
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("not a png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(d / "ok.jpg", quality=90)
    data = (d / "ok.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])


def test_bad_files_are_skipped_with_warning_and_counted(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    _zoo(root)
    with pytest.warns(SkippedImageWarning) as rec:
        ds = load_dataset(root, cache_dir=tmp_path / "c", workers=2)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert sorted(reasons) == ["text.png", "trunc.jpg", "zero.jpg"]
    assert len(ds.splits["train"]) == 5 and ds.splits["train"].labels.tolist() == [0, 0, 0, 1, 1]
    assert len(ds.splits["train"].skipped) == 3
    assert any("zero.jpg" in str(w.message) for w in rec)


def test_strict_fails_at_the_first_bad_file(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2}})
    _zoo(root)
    with pytest.raises(UserError, match=r"text\.png .*--strict"):
        load_dataset(root, cache_dir=tmp_path / "c", strict=True, workers=1)


def test_odd_size_is_resized_into_the_memory_array(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 3}})
    Image.fromarray(np.full((12, 18, 3), 77, np.uint8)).save(root / "train" / "a" / "big.png")
    assert load_dataset(root, cache_dir=tmp_path / "c", workers=1).kind == "stream"  # 1 of 4 differs
    ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1, kind="memory")
    assert ds.kind == "memory" and ds.splits["train"].images.shape == (4, 3, 6, 6)
    assert (
        ds.splits["train"].paths[3].endswith("big.png")
        and int(ds.splits["train"].images[3].float().mean()) == 77
    )


def test_a_thin_strip_is_skipped_not_blown_up_into_the_memory_array(tmp_path):
    """Resized to cover 6 x 6 whole, a 1 x 900 strip became 6 x 5,400 first; at 224 x 224 a 1 x 20,000 strip
    (a small file) needs gigabytes. It is refused by the aspect rule the streamed views use."""
    root = make_folder(tmp_path / "d", {"train": {"a": 3}})
    Image.fromarray(np.zeros((900, 1, 3), np.uint8)).save(root / "train" / "a" / "strip.png")
    with pytest.warns(SkippedImageWarning, match="strip.png.*thinner than the 100:1"):
        ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1, kind="memory")
    assert ds.splits["train"].images.shape == (3, 3, 6, 6) and len(ds.splits["train"].skipped) == 1


def test_a_strip_among_mixed_sizes_is_refused_by_the_streaming_index_not_mid_run(tmp_path):
    """The streamed loader refuses a 100:1 strip when a view resizes it: the index, built before training,
    must refuse it too, so --strict fails at once and the counts `resnet data` prints are the trainer's."""
    root = tmp_path / "d"
    for i, (h, w) in enumerate([(10, 14), (12, 9), (16, 16)]):
        (root / "train" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(root / "train" / "c" / f"{i}.png")
    Image.fromarray(np.zeros((1, 300, 3), np.uint8)).save(root / "train" / "c" / "strip.png")
    with pytest.raises(UserError, match=r"strip\.png is 300x1, thinner than the 100:1.*--strict"):
        load_dataset(root, cache_dir=tmp_path / "c", strict=True, workers=1)
    with pytest.warns(SkippedImageWarning, match="strip.png"):
        ds = load_dataset(root, cache_dir=tmp_path / "c2", workers=1)
    assert ds.kind == "stream" and len(ds.splits["train"]) == 3 and len(ds.skipped) == 1


def test_a_dangling_link_is_skipped_with_its_path_not_silently_dropped(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 3}})
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.warns(SkippedImageWarning, match="gone.png"):
        ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1)
    assert [(Path(p).name, "cannot be read" in r) for p, r in ds.skipped] == [("gone.png", True)]
    assert len(ds.splits["train"]) == 3


@pytest.mark.parametrize("kind", ["memory", "stream"])
def test_a_class_folder_whose_every_image_is_bad_is_refused_like_an_empty_one(tmp_path, kind):
    """It used to stay in the classes with no training image at all, the output never learnt."""
    root = make_folder(tmp_path / "d", {"train": {"a": 3, "b": 0}})
    (root / "train" / "b").mkdir(exist_ok=True)
    (root / "train" / "b" / "junk.png").write_text("not an image")
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"class folder .*train/b has no usable images: all 2 were skipped") as err:
        load_dataset(root, cache_dir=tmp_path / "c", workers=1, kind=kind)
    assert "\n" not in str(err.value)


def test_mixed_sizes_stream_with_validated_index(tmp_path):
    root = tmp_path / "d"
    for i, (h, w) in enumerate([(10, 14), (12, 9), (16, 16)]):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(root / "train" / f"c{i % 2}" / f"{i}.jpg")
    (root / "train" / "c0" / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.warns(SkippedImageWarning):
        ds = load_dataset(root, cache_dir=tmp_path / "c", workers=1)
    train = ds.splits["train"]
    assert ds.kind == "stream" and ds.image_size is None and len(train) == 3
    assert sorted(train.sizes) == [(10, 14), (12, 9), (16, 16)] and len(ds.skipped) == 1
    index = json.loads(next((tmp_path / "c").glob("*.stream.json")).read_text())
    assert index["n"] == 4 and len(index["bad"]) == 1


def test_val_carved_with_seed_count_or_fraction(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 10, "b": 10}})
    ds = load_dataset(root, cache_dir=tmp_path / "c", val_size=5, seed=3, workers=1)
    same = load_dataset(root, cache_dir=tmp_path / "c", val_size=5, seed=3, workers=1)
    other = load_dataset(root, cache_dir=tmp_path / "c", val_size=0.25, seed=4, workers=1)
    assert (len(ds.splits["train"]), len(ds.splits["val"])) == (15, 5)
    assert ds.splits["val"].paths == same.splits["val"].paths
    assert len(other.splits["val"]) == 5 and other.splits["val"].paths != ds.splits["val"].paths
    assert not set(ds.splits["val"].paths) & set(ds.splits["train"].paths)
    assert sorted(ds.splits["val"].paths + ds.splits["train"].paths) == sorted(
        p for p in map(str, root.rglob("*.png"))
    )
    val = ds.splits["val"]
    assert all(int(val.images[i, 0, 0, 0]) == 10 + 40 * int(val.labels[i]) for i in range(len(val)))
    with pytest.raises(UserError, match="leaves no training images"):
        load_dataset(root, cache_dir=tmp_path / "c", val_size=20, workers=1)
    # A fraction that rounds to no image at all used to get the same "choose fewer".
    with pytest.raises(UserError, match=r"val_size 0.01 holds out no images of the 20 in train; choose more"):
        load_dataset(root, cache_dir=tmp_path / "c", val_size=0.01, workers=1)


def _load_in_child(root, cache, queue):
    import torch

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (as DataLoader workers)
    ds = load_dataset(root, cache_dir=cache, workers=1)
    queue.put(ds.splits["train"].images.numpy().sum().item())


def test_concurrent_processes_share_one_complete_cache(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 20, "b": 20}})
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(root, tmp_path / "c", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        sums = [queue.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    expect = load_dataset(root, cache_dir=tmp_path / "c", workers=1).splits["train"].images.numpy().sum()
    assert sums == [expect] * 3 and all(p.exitcode == 0 for p in procs)
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]


def test_fit_to_covers_then_centre_crops():
    arr = np.zeros((3, 4, 8), np.uint8)
    arr[:, :, 2:6] = 255  # bright centre columns
    out = cache_mod.fit_to(arr, 4, 4)
    assert out.shape == (3, 4, 4) and out.mean() > 200


@pytest.mark.skipif(
    not SHARED_CIFAR.is_dir(), reason="the shared CIFAR-10 JPEG folder is not on this machine"
)
def test_shared_cifar10_folder_scans_50000_in_10_classes():
    classes, splits = scan_folder(SHARED_CIFAR)
    train = splits["train"]
    assert list(splits) == ["train"] and len(classes) == 10 and classes[0] == "airplane"
    assert len(train.paths) == 50_000 and np.bincount(train.labels).tolist() == [5000] * 10
    from resnet.data.decode import decode_image

    for p in train.paths[::2500]:
        assert decode_image(p).shape == (3, 32, 32)


def test_a_misnamed_split_folder_is_warned_about_and_killed_builds_leave_no_temporaries(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"a": 2}, "validation": {"a": 1}})
    cache = tmp_path / "c"
    cache.mkdir()
    _, _, slot = cache_mod.cache_paths(cache, str(root), "train", "f" * 64)
    stale = cache / f".folder-{slot}-0123.u8.npy.abc.tmp"  # left by a build that was killed
    stale.write_bytes(b"half an array")
    with pytest.warns(UserWarning, match="folders validation are not read; the splits must be named train, val"):
        ds = load_dataset(root, cache_dir=cache, workers=1)
    assert sorted(ds.splits) == ["train"] and not stale.exists()
