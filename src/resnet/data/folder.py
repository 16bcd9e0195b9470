"""ImageFolder scanning: ROOT/<split>/<class>/<image>, splits train/val/test, classes in sorted order.

Only names are read here (and sizes/mtimes for the cache fingerprint); decoding happens in `cache`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .decode import is_image_name

SPLITS = ("train", "val", "test")


@dataclass
class ScannedSplit:
    """The files of one split in a fixed order (class, then file name) with what the fingerprint needs."""

    name: str
    paths: list[str] = field(default_factory=list)  # absolute
    labels: list[int] = field(default_factory=list)
    # (relative path, bytes, mtime_ns, ctime_ns, inode): mtime can be set by hand (cp -p, rsync -t, tar), so a
    # file replaced by another of the same size and mtime would pass; its ctime and inode change all the same.
    stats: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # the classes this split's folder holds

    def fingerprint(self, *extra: object) -> str:
        """A hash of the file list, its sizes, mtimes, ctimes and inodes, and `extra` (decode settings)."""
        h = hashlib.sha256()
        for rel, *numbers in self.stats:
            # surrogateescape: a file name that is not UTF-8 (a Latin-1 name on Linux) hashes as its bytes
            h.update((rel + "".join(f"\0{n}" for n in numbers) + "\n").encode("utf-8", "surrogateescape"))
        h.update(repr(extra).encode())
        return h.hexdigest()


def _visible_dirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def image_files_under(path: Path, unreadable: list[tuple[str, str]] | None = None) -> list[os.DirEntry]:
    """Image files in a folder (a class folder) and its visible subfolders, sorted by path. A linked folder is
    followed once: a link back up the tree (a loop) is skipped, so no image is read twice. A subfolder that
    cannot be listed raises, or, when `unreadable` is given, is added to it as (path, reason) and skipped."""
    out = []
    stack = [path]
    top = path.resolve()
    seen = {top}
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as err:
            if unreadable is None or d == path:
                raise
            unreadable.append((str(d), err.strerror or str(err)))
            continue
        with it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    real = Path(e.path).resolve()
                    if real in seen or real in top.parents:  # visited, or above: a loop
                        continue
                    seen.add(real)
                    stack.append(Path(e.path))
                elif is_image_name(e.name) and (e.is_file() or e.is_symlink()):
                    out.append(e)  # a dangling link is kept: decoding refuses it with its path, counted
    out.sort(key=lambda e: e.path)
    return out


def scan_folder(root: str | os.PathLike) -> tuple[list[str], dict[str, ScannedSplit]]:
    """(sorted class names, {split: ScannedSplit}) for an ImageFolder root; UserError when it is not one."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(
            f"the data folder {root} {what}; give cifar10, cifar100, digits or a folder "
            f"laid out as ROOT/train/<class>/<image>."
        )
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        found = _visible_dirs(root)
        hint = f" (it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
        raise UserError(
            f"{root} has no train, val or test folder{hint}; lay it out as "
            f"ROOT/train/<class>/<image> (and optionally ROOT/val, ROOT/test)."
        )
    ignored = [d for d in _visible_dirs(root) if d not in SPLITS]
    if ignored:  # e.g. "validation" or "Train": say so instead of silently training without them
        warnings.warn(f"{root}: folders {', '.join(ignored[:5])} are not read; the splits must be named "
                      f"train, val and test.", UserWarning, stacklevel=2)
    splits: dict[str, ScannedSplit] = {}
    for split in present:
        split_dir = root / split
        class_names = _visible_dirs(split_dir)
        if not class_names:
            raise UserError(
                f"the {split} split {split_dir} has no class folders; put each class's images in "
                f"{split_dir}/<class>/."
            )
        scanned = ScannedSplit(split, class_names=class_names)
        for name in class_names:
            files = image_files_under(split_dir / name)
            if not files:
                raise UserError(
                    f"the class folder {split_dir / name} holds no images; add some or remove it."
                )
            for e in files:
                try:
                    st = e.stat()
                except OSError:  # a dangling link: fingerprint the link itself; decoding skips it
                    st = e.stat(follow_symlinks=False)
                scanned.paths.append(e.path)
                scanned.stats.append(
                    (os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                )
        splits[split] = scanned
    if "train" in splits:
        classes = splits["train"].class_names
        for split in present:
            extra = sorted(set(splits[split].class_names) - set(classes))
            if extra:
                raise UserError(
                    f"the {split} split of {root} has classes that train lacks "
                    f"({', '.join(extra[:5])}); every class must have training images."
                )
    else:
        classes = sorted({c for s in splits.values() for c in s.class_names})
    index = {c: i for i, c in enumerate(classes)}
    for split in splits.values():
        for rel, *_ in split.stats:
            split.labels.append(index[Path(rel).parts[1]])
    return classes, splits
