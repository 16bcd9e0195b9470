"""CIFAR binary release (download with checksum, archive, extracted files) and the digits set."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from resnet.data import load_dataset
from resnet.data import sources as src
from resnet.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _records(n: int, label_bytes: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1).tobytes(), labels[:, -1].astype(np.int64), pixels


def make_archive(kind: str = "cifar10", n: int = 4) -> tuple[bytes, dict]:
    """A small archive in the exact binary-release layout; returns (tar.gz bytes, what it holds)."""
    spec = src.CIFAR[kind]
    members, truth = {}, {"train": [], "test": []}
    names = CIFAR10_NAMES if kind == "cifar10" else [f"class{i:03d}" for i in range(100)][::-1]  # unsorted
    for i, f in enumerate(spec.train_files + spec.test_files):
        raw, labels, pixels = _records(n, spec.label_bytes, spec.num_classes, seed=i)
        members[f"{spec.folder}/{f}"] = raw
        truth["train" if f in spec.train_files else "test"].append((labels, pixels))
    members[f"{spec.folder}/{spec.names_file}"] = ("\n".join(names) + "\n\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {"names": names, **truth}


@contextlib.contextmanager
def serve(body: bytes, *, claim: int | None = None, ranges: bool = False):
    """Serve `body` at http://127.0.0.1:PORT/f on a thread; `claim` announces a longer Content-Length
    than is sent (a cut transfer); `ranges` honours Range requests."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.headers.get("Range"))
            start = 0
            rng = self.headers.get("Range")
            if ranges and rng:
                start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206)
            else:
                self.send_response(200)
            data = body[start:]
            self.send_header("Content-Length", str(claim if claim is not None else len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/f", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_verifies_and_renames(tmp_path):
    body = b"x" * 5000
    with serve(body) as (url, _):
        out = src.download(url, tmp_path / "a.bin", hashlib.md5(body).hexdigest(), chunk=1024, timeout=5)
    assert out.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.bin.lock", "a.bin"]


def test_download_wrong_checksum_leaves_nothing(tmp_path):
    with serve(b"y" * 3000) as (url, _), pytest.raises(UserError, match="MD5 .* not the published"):
        src.download(url, tmp_path / "a.bin", "0" * 32, timeout=5)
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.part").exists()


def test_download_cut_short_keeps_its_bytes_and_the_next_run_continues(tmp_path):
    """A connection cut short used to delete the partial file, so the most common interruption started
    the whole download over."""
    body = bytes(range(256)) * 24
    with serve(body[:3000], claim=len(body)) as (url, _), pytest.raises(UserError, match="cut short.*continues"):
        src.download(url, tmp_path / "a.bin", hashlib.md5(body).hexdigest(), timeout=5)
    assert not (tmp_path / "a.bin").exists() and (tmp_path / "a.bin.part").read_bytes() == body[:3000]
    with serve(body, ranges=True) as (url, hits):
        src.download(url, tmp_path / "a.bin", hashlib.md5(body).hexdigest(), timeout=5)
    assert hits == ["bytes=3000-"] and (tmp_path / "a.bin").read_bytes() == body


def test_a_whole_part_file_left_by_a_kill_before_its_rename_is_used_without_the_network(tmp_path):
    body = b"w" * 2000
    (tmp_path / "a.bin.part").write_bytes(body)
    out = src.download("http://127.0.0.1:9/none", tmp_path / "a.bin", hashlib.md5(body).hexdigest())
    assert out.read_bytes() == body and not (tmp_path / "a.bin.part").exists()


def test_download_resumes_a_killed_transfer(tmp_path):
    body = bytes(range(256)) * 40
    (tmp_path / "a.bin.part").write_bytes(body[:1000])  # what a killed run leaves behind
    with serve(body, ranges=True) as (url, hits):
        src.download(url, tmp_path / "a.bin", hashlib.md5(body).hexdigest(), timeout=5)
    assert hits == ["bytes=1000-"]
    assert (tmp_path / "a.bin").read_bytes() == body


def test_download_unreachable_server_is_one_sentence(tmp_path):
    with serve(b"") as (url, _):
        pass  # server closed: the port refuses connections now
    with pytest.raises(UserError, match="could not download"):
        src.download(url, tmp_path / "a.bin", "0" * 32, timeout=2)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_download_extract_and_read(tmp_path, monkeypatch, kind):
    archive, truth = make_archive(kind)
    spec = src.CIFAR[kind]
    with serve(archive) as (url, hits):
        monkeypatch.setitem(
            src.CIFAR,
            kind,
            src.CifarSpec(**{**spec.__dict__, "url": url, "md5": hashlib.md5(archive).hexdigest()}),
        )
        ds = load_dataset(kind, data_dir=tmp_path, val_size=3, seed=1)
        assert len(hits) == 1
        load_dataset(kind, data_dir=tmp_path)  # extracted files are used: no second download
        assert len(hits) == 1
    assert ds.classes == sorted(truth["names"]) and ds.kind == "memory" and ds.image_size == (32, 32)
    n_train = 4 * len(spec.train_files)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": n_train - 3, "val": 3, "test": 4}
    # The records come back exactly: pixels in channel-major order, labels remapped to sorted names.
    test = ds.splits["test"]
    labels, pixels = truth["test"][0]
    remap = [ds.classes.index(c) for c in truth["names"]]
    assert np.array_equal(test.images.numpy().reshape(4, -1), pixels)
    assert test.labels.tolist() == [remap[i] for i in labels]
    assert len(ds.mean) == 3 and all(0.4 < m < 0.6 for m in ds.mean)  # uniform random pixels


def _offline_spec(monkeypatch, archive: bytes) -> None:
    """cifar10 with an unreachable URL and the MD5 of our small archive."""
    spec = {**src.CIFAR["cifar10"].__dict__, "url": "http://127.0.0.1:9/none", "md5": hashlib.md5(archive).hexdigest()}
    monkeypatch.setitem(src.CIFAR, "cifar10", src.CifarSpec(**spec))


def test_cifar_archive_already_present_needs_no_network(tmp_path, monkeypatch):
    archive, _ = make_archive("cifar10", n=2)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive)
    _offline_spec(monkeypatch, archive)
    ds = load_dataset("cifar10", data_dir=tmp_path, in_chans=1)
    assert ds.splits["train"].images.shape == (10, 1, 32, 32) and len(ds.mean) == 1


def test_an_archive_put_in_place_is_checked_and_a_half_extracted_folder_is_replaced(tmp_path, monkeypatch):
    """tarfile never reads gzip's CRC, so a damaged archive used to extract into wrong pixels unnoticed;
    a folder left half-extracted beside a good archive used to fail with FileNotFoundError."""
    archive, truth = make_archive("cifar10", n=2)
    _offline_spec(monkeypatch, archive)
    damaged = bytearray(archive)
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="does not match the published MD5.*delete it"):
        load_dataset("cifar10", data_dir=tmp_path)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive)
    partial = tmp_path / "cifar-10-batches-bin"
    partial.mkdir()
    (partial / "data_batch_1.bin").write_bytes(b"\0" * 3073)  # a killed `tar x`: one file, no names
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert len(ds.splits["test"]) == 2 and (partial / "batches.meta.txt").is_file()
    assert np.array_equal(ds.splits["test"].images.numpy().reshape(2, -1), truth["test"][0][1])


def test_an_unwritable_data_directory_is_one_sentence(tmp_path, monkeypatch):
    """A shared read-only directory holding only the archive: the lock file cannot be created there."""
    archive, _ = make_archive("cifar10", n=2)
    _offline_spec(monkeypatch, archive)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive)

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(src, "file_lock", read_only)
    with pytest.raises(UserError, match="cannot write in the data directory .*Permission denied.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_a_full_disk_is_named_as_such_not_blamed_on_the_download_or_the_archive(tmp_path, monkeypatch):
    """'delete the archive and run again' (extraction) or 'run again: it continues' (download) cannot help
    when the disk is full."""
    import errno

    archive, _ = make_archive("cifar10", n=2)
    _offline_spec(monkeypatch, archive)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(src.shutil, "copyfileobj", full)
        with pytest.raises(UserError, match="cannot write in the data directory .*No space left.*--data-dir") as err:
            load_dataset("cifar10", data_dir=tmp_path)
    assert "delete" not in str(err.value) and (tmp_path / "cifar-10-binary.tar.gz").exists()
    body = bytes(range(256)) * 8

    class FullFile(io.BytesIO):
        def write(self, _block):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def open_part_on_a_full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part") and mode in ("wb", "ab"):
            return FullFile()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_part_on_a_full_disk)
    with serve(body) as (url, _), pytest.raises(UserError, match="cannot write in the data directory") as err:
        src.download(url, tmp_path / "b.bin", hashlib.md5(body).hexdigest(), timeout=5)
    assert "continues" not in str(err.value)


def test_cifar_corrupt_batch_file_is_a_user_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for f in src.CIFAR["cifar10"].train_files + src.CIFAR["cifar10"].test_files:
        (folder / f).write_bytes(b"\0" * 3000)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES))
    with pytest.raises(UserError, match="not a CIFAR binary batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_published_checksums():
    assert src.CIFAR["cifar10"].md5 == "c32a1d4ab5d03f1284b67883e8d87530"
    assert src.CIFAR["cifar100"].md5 == "03b5dce01913d631647c71ecec9e9cb8"


def test_default_dirs_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("RESNET_CACHE_DIR", str(tmp_path / "c"))
    assert src.default_data_dir() == tmp_path / "d" and src.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RESNET_DATA_DIR")
    assert src.default_data_dir().parts[-3:] == (".cache", "resnet", "datasets")


def test_digits_fixed_split_and_channels():
    ds = load_dataset("digits", in_chans=1)
    again = load_dataset("digits", in_chans=3)
    train, test = ds.splits["train"], ds.splits["test"]
    assert (len(train), len(test)) == (1437, 360) and ds.classes == [str(i) for i in range(10)]
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype.is_floating_point is False
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert again.splits["train"].images.shape == (1437, 3, 8, 8)
    assert np.array_equal(again.splits["test"].images[:, 1].numpy(), test.images[:, 0].numpy())
    assert again.splits["test"].labels.tolist() == test.labels.tolist()


def test_unknown_source_names_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="did you mean cifar10"):
        load_dataset("cifar1O")
