"""What `resnet data` prints: a data source the way the trainer sees it, per split."""

from __future__ import annotations

from collections import Counter

from .dataset import Dataset


def _size_text(split) -> list[int] | dict | None:
    if split.image_size is not None:
        return list(split.image_size)
    sizes = getattr(split, "sizes", None)
    if not sizes:
        return None
    hs, ws = [s[0] for s in sizes], [s[1] for s in sizes]
    return {"min": [min(hs), min(ws)], "max": [max(hs), max(ws)], "distinct": len(set(map(tuple, sizes)))}


def describe(ds: Dataset) -> dict:
    """{"name", "kind", "classes", "in_chans", "mean", "std", "image_size", "skipped",
    "splits": {split: {"n", "classes", "class_counts", "image_size", "skipped": [{"path", "reason"}]}}}."""
    splits = {}
    for name, split in ds.splits.items():
        counts = Counter(split.labels.tolist())
        splits[name] = {
            "n": len(split),
            "classes": ds.classes,
            "class_counts": {c: counts.get(i, 0) for i, c in enumerate(ds.classes)},
            "image_size": _size_text(split),
            "skipped": [{"path": p, "reason": r} for p, r in split.skipped],
        }
    return {
        "name": ds.name,
        "source": ds.source,
        "kind": ds.kind,
        "classes": ds.classes,
        "in_chans": ds.in_chans,
        "mean": ds.mean,
        "std": ds.std,
        "image_size": list(ds.image_size) if ds.image_size else None,
        "skipped": len(ds.skipped),
        "splits": splits,
    }


def describe_text(info: dict) -> str:
    """The human-readable form of `describe`: one table row per split, then the skipped files."""
    lines = [
        f"{info['name']}: {len(info['classes'])} classes, {info['in_chans']} channel(s), "
        f"{info['kind']} ({'held in memory' if info['kind'] == 'memory' else 'streamed from files'})",
        "mean "
        + ", ".join(f"{m:.4f}" for m in info["mean"])
        + "; std "
        + ", ".join(f"{s:.4f}" for s in info["std"]),
        "",
    ]
    rows = [["split", "images", "image size", "skipped", "per class (min-max)"]]
    for name, s in info["splits"].items():
        size = s["image_size"]
        if isinstance(size, dict):
            size = f"{size['min'][0]}x{size['min'][1]} .. {size['max'][0]}x{size['max'][1]}"
        elif size:
            size = f"{size[0]}x{size[1]}"
        counts = list(s["class_counts"].values())
        rows.append(
            [
                name,
                f"{s['n']:,}",
                str(size or "-"),
                str(len(s["skipped"])),
                f"{min(counts):,}-{max(counts):,}" if counts else "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [c.ljust(w) if j in (0, 2) else c.rjust(w) for j, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    classes = info["classes"]
    lines += [
        "",
        "classes: "
        + ", ".join(classes[:20])
        + (f", ... ({len(classes)} in all)" if len(classes) > 20 else ""),
    ]
    skipped = [(n, f) for n, s in info["splits"].items() for f in s["skipped"]]
    if skipped:
        lines += ["", f"skipped {len(skipped)} file(s):"]
        lines += [f"  [{n}] {f['path']}: {f['reason']}" for n, f in skipped[:50]]
        if len(skipped) > 50:
            lines.append(f"  ... and {len(skipped) - 50} more (use --format json for all)")
    return "\n".join(lines)
