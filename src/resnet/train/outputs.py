"""What a run leaves in its directory: metrics.jsonl, TensorBoard events, curves.png, config and summary.

Only rank 0 writes. On resume, metrics written after the checkpoint being resumed are dropped (they will
be produced again, identically), so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from ..artifacts import atomic_write_bytes


def _after_existing_event_files(tb_dir: Path) -> None:
    """Wait, if need be, until the clock has left the second in which the newest event file in `tb_dir` was
    created. TensorBoard reads a folder's files in name order; a name is the creation second, then the host,
    the process id and a counter, compared as text. Two attempts of a run started within one second could
    then be read in the wrong order (a counter of 10 sorts before 9), and the later attempt's purge marker
    would be read first and purge nothing. Costs at most a second, and only for a restart within a second: a
    file stamped later than that (another host's clock, or a file copied in) is not waited for."""
    seconds = []
    for p in tb_dir.glob("events.out.tfevents.*"):
        part = p.name.split(".")[3]
        if part.isdigit():
            seconds.append(int(part))
    if seconds and max(seconds) <= int(time.time()) + 1:
        while int(time.time()) <= max(seconds):
            time.sleep(0.02)


class RunLog:
    """metrics.jsonl plus TensorBoard scalars (when torch.utils.tensorboard imports)."""

    def __init__(self, out_dir: Path, resume_iter: int | None, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.note = ""
        if not enabled:
            return
        self._truncate(resume_iter)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # A fresh start (the first attempt died before its first checkpoint) drops every old point too,
            # as metrics.jsonl does: TensorBoard shows no step twice.
            purge = 0 if resume_iter is None else resume_iter + 1
            _after_existing_event_files(out_dir / "tb")
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge)
        except ImportError:  # tensorboard is in the `demo` extra
            self.note = "TensorBoard is not installed (pip install 'resnet[demo]'); no event files written."

    def _truncate(self, resume_iter: int | None) -> None:
        if not self.path.exists():
            return
        keep = []
        if resume_iter is not None:
            # errors="replace": a damaged byte spoils its own line (dropped below), not the resumption.
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill, or damaged
                    continue
                # The test line comes from finish(), which a resumed run repeats.
                if _is_record(rec) and rec["iter"] <= resume_iter and rec["split"] != "test":
                    keep.append(line)
        atomic_write_bytes(self.path, "".join(f"{line}\n" for line in keep).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in ("loss", "top1_err", "top5_err", "lr", "images_per_s"):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"{record['split']}/{key}", record[key], record["iter"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _is_record(rec) -> bool:
    """True for a line this log writes (the iteration, split and error every reader takes), else false."""
    return (isinstance(rec, dict) and type(rec.get("iter")) is int and isinstance(rec.get("split"), str)
            and isinstance(rec.get("top1_err"), (int, float)))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_yaml(path: Path, doc: dict) -> None:
    atomic_write_bytes(path, yaml.safe_dump(doc, sort_keys=False).encode())


def write_json(path: Path, doc: dict) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def plot_curves(metrics: list[dict], path: Path, title: str) -> str | None:
    """Training error (thin) and validation error (bold) against iterations, as in the paper's Fig. 4/6.

    Returns a note instead of raising when matplotlib (the `demo` extra) is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'resnet[demo]'); curves.png not drawn."
    train = [(m["iter"], m["top1_err"]) for m in metrics if m["split"] == "train"]
    val = [(m["iter"], m["top1_err"]) for m in metrics if m["split"] == "val"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, color="C0", label="train error")
    if val:
        ax.plot(*zip(*val, strict=True), lw=2.2, color="C0", label="val error",
                marker="o" if len(val) < 3 else None)
    ax.set_xlabel("iter.")
    ax.set_ylabel("error (%)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:g}"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:  # a run stopped before its first log line has nothing to name
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")  # the suffix tells matplotlib the format
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return None


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over iterations, quiet when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, leave=True,
                disable=not (enabled and sys.stderr.isatty()))
