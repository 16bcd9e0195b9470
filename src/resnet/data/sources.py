"""Where data comes from: the per-user directories, the CIFAR binary release (download with checksum) and
the embedded digits set.

CIFAR is read from the official *binary* release only (fixed-size records: label byte(s) + 3,072 pixel
bytes). The "python" release is a pickle, and unpickling a downloaded file runs whatever code it holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, user_path


def default_data_dir() -> Path:
    """Datasets live here unless `--data-dir` says otherwise: $RESNET_DATA_DIR or ~/.cache/resnet/datasets."""
    env = os.environ.get("RESNET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resnet" / "datasets"


def default_cache_dir() -> Path:
    """Decoded-image caches live here: $RESNET_CACHE_DIR or ~/.cache/resnet/cache (never in a data folder)."""
    env = os.environ.get("RESNET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resnet" / "cache"


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive advisory lock on `path` (created if needed): one process downloads or decodes while
    the others (torchrun ranks, a second run) wait and then find the finished result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- download
def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    url: str, dest: str | os.PathLike, md5: str, *, timeout: float = 60.0, chunk: int = 1 << 20
) -> Path:
    """Fetch `url` to `dest`, verified against `md5`; `dest` appears only when complete and correct.

    Bytes go to `dest.part`; an interrupted transfer (a kill, or a connection cut short) leaves only that
    file, and the next run continues it with an HTTP range request when the server allows, else starts
    over. A `.part` that is already whole (killed before its rename) is checked and used. A wrong
    checksum raises UserError and removes the partial file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(f".{dest.name}.lock")):  # hidden: an empty marker, safe to leave
        if not dest.exists():
            part = dest.with_name(dest.name + ".part")
            if part.exists() and md5_of(part) == md5.lower():
                os.replace(part, dest)
                return dest
            if not _fetch(url, part, timeout, chunk, resume=True):
                _fetch(url, part, timeout, chunk, resume=False)  # the server refused our range: start over
            actual = md5_of(part)
            if actual != md5.lower():
                part.unlink(missing_ok=True)
                raise UserError(
                    f"the download of {url} has MD5 {actual}, not the published {md5}; the file "
                    f"was removed, run the command again (or check the mirror)."
                )
            os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, chunk: int, *, resume: bool) -> bool:
    """Append the rest of `url` to `part` (or write it anew); False when a range request was refused."""
    have = part.stat().st_size if resume and part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "resnet-data/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already as long as (or longer than) the file
            return False
        raise UserError(
            f"could not download {url} (HTTP {err.code}); put {part.name[:-5]} into {part.parent} "
            f"by hand or try again later."
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"could not download {url} ({reason}); check the network, or put {part.name[:-5]} "
            f"into {part.parent} by hand."
        ) from None
    with response:
        resumed = bool(have) and response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while block := response.read(chunk):
                    f.write(block)
                    got += len(block)
                f.flush()
                os.fsync(f.fileno())
        except (http.client.IncompleteRead, OSError) as err:  # the bytes so far stay in `part`
            _refuse_unwritable(err, part.parent)
            raise UserError(
                f"the download of {url} was cut short after {got:,} bytes ({type(err).__name__}); "
                f"run the command again: it continues from there."
            ) from None
    if expected is not None and got != expected:
        raise UserError(
            f"the download of {url} was cut short: {got:,} of {expected:,} bytes arrived; "
            f"run the command again: it continues from there."
        )
    return True


# ------------------------------------------------------------------------------------------------ CIFAR
@dataclass(frozen=True)
class CifarSpec:
    """One CIFAR binary release: where to get it and how its records are laid out."""

    name: str
    url: str
    md5: str
    archive: str
    folder: str  # the top folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    names_file: str
    label_bytes: int  # bytes before the pixels; the label we use is the last of them (the fine label)
    num_classes: int


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-binary.tar.gz",
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        "batches.meta.txt",
        1,
        10,
    ),
    "cifar100": CifarSpec(
        "cifar100",
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8",
        "cifar-100-binary.tar.gz",
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
        "fine_label_names.txt",
        2,
        100,
    ),
}
RECORD_PIXELS = 3 * 32 * 32


def _extract(spec: CifarSpec, archive: Path, root: Path) -> None:
    """Extract only the files we read, by name, into a temp folder renamed into place when complete."""
    wanted = {f"{spec.folder}/{n}" for n in (*spec.train_files, *spec.test_files, spec.names_file)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            found = set()
            for member in tar:
                name = member.name.lstrip("./")
                if name in wanted and member.isfile():
                    src = tar.extractfile(member)
                    with src, open(tmp / Path(name).name, "wb") as out:
                        shutil.copyfileobj(src, out)
                    found.add(name)
        missing = sorted(wanted - found)
        if missing:
            raise UserError(
                f"{archive} is not the CIFAR binary release: it lacks {', '.join(missing)}; "
                f"delete it and run again to download a fresh copy."
            )
        final = root / spec.folder
        if not _complete(spec, final):  # absent, or left half-extracted by hand or by a killed process
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except (tarfile.TarError, OSError, EOFError) as err:
        _refuse_unwritable(err, root)
        raise UserError(f"{archive} cannot be extracted ({err}); delete it and run again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Errors of the folder written to, not of the download or the archive: running again cannot help.
_UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _refuse_unwritable(err: BaseException, folder: Path) -> None:
    if isinstance(err, OSError) and err.errno in _UNWRITABLE:
        raise UserError(f"cannot write in the data directory {folder} ({err.strerror}); free space there or "
                        f"choose another with --data-dir or RESNET_DATA_DIR.") from None


def _complete(spec: CifarSpec, folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*spec.train_files, *spec.test_files, spec.names_file))


def cifar_folder(name: str, data_dir: str | os.PathLike | None = None, *, download_ok: bool = True) -> Path:
    """The extracted CIFAR binary folder under `data_dir`: found, extracted, or downloaded. An archive found
    in place (put there by hand) is checked against the published MD5 before it is extracted."""
    spec = CIFAR[name]
    root = user_path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / spec.folder
    if _complete(spec, folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the data directory {root} ({err.strerror}); "
            f"choose another with --data-dir or RESNET_DATA_DIR."
        ) from None
    archive = root / spec.archive
    try:
        with file_lock(root / f".{spec.name}.lock"):
            if not _complete(spec, folder):
                if not archive.exists():
                    if not download_ok:
                        raise UserError(
                            f"{name} is not in {root}; put {spec.archive} there or allow the download."
                        )
                    download(spec.url, archive, spec.md5)  # verifies the MD5 before the file is named
                elif md5_of(archive) != spec.md5:
                    raise UserError(
                        f"{archive} does not match the published MD5 of the {name} release (damaged or "
                        f"another file); delete it and run again to download it, or put the right file there."
                    )
                _extract(spec, archive, root)
    except OSError as err:  # a read-only or full data directory
        raise UserError(
            f"cannot write in the data directory {root} ({err.strerror or err}); choose another with "
            f"--data-dir or RESNET_DATA_DIR, or extract {spec.archive} there by hand."
        ) from None
    return folder


def read_cifar_records(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x 32 x 32 images and int64 labels from one binary batch file."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + RECORD_PIXELS
    if raw.size == 0 or raw.size % record:
        raise UserError(
            f"{path} is not a CIFAR binary batch ({raw.size:,} bytes is not a multiple of {record}); "
            f"delete its folder and run again."
        )
    raw = raw.reshape(-1, record)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), raw[:, label_bytes - 1].astype(np.int64)


def load_cifar(name: str, data_dir: str | os.PathLike | None = None) -> tuple[list[str], dict]:
    """(sorted class names, {"train": (images, labels), "test": (images, labels)}) from the binary release.

    Labels are remapped so that index = position in the sorted names (the project's rule), whatever order
    the release lists its names in (CIFAR-10's and CIFAR-100's happen to be sorted already).
    """
    spec = CIFAR[name]
    folder = cifar_folder(name, data_dir)
    native = [line.strip() for line in (folder / spec.names_file).read_text().splitlines() if line.strip()]
    if len(native) != spec.num_classes:
        raise UserError(
            f"{folder / spec.names_file} lists {len(native)} classes, not {spec.num_classes}; "
            f"delete {folder} and run again."
        )
    classes = sorted(native)
    remap = np.array([classes.index(c) for c in native], dtype=np.int64)
    splits = {}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        parts = [read_cifar_records(folder / f, spec.label_bytes) for f in files]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if labels.max(initial=0) >= spec.num_classes:
            raise UserError(
                f"{folder} holds a label {int(labels.max())} outside 0..{spec.num_classes - 1}; "
                f"delete it and run again."
            )
        splits[split] = (images, remap[labels])
    return classes, splits


# ----------------------------------------------------------------------------------------------- digits
DIGITS_TEST = 360  # of 1,797: a fixed 1,437 / 360 train/test split
DIGITS_SEED = 20150  # fixed forever: the split is part of the data set's definition


def load_digits_set() -> tuple[list[str], dict]:
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 1 x 8 x 8 (0..16 -> 0..255), fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "the digits demo set needs scikit-learn; install it with pip install 'resnet[demo]'."
        ) from None
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
    test, train = np.sort(order[:DIGITS_TEST]), np.sort(order[DIGITS_TEST:])
    classes = [str(i) for i in range(10)]
    return classes, {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
