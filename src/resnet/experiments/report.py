"""Reading finished runs and writing an experiment's report: tables, plots and the header that says
what it was measured on."""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from pathlib import Path

from ..machine import machine_info


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(metrics: list[dict], split: str) -> list[tuple[int, float]]:
    return [(m["iter"], m["top1_err"]) for m in metrics if m.get("split") == split and "top1_err" in m]


def final_train_err(metrics: list[dict], tail: float = 0.2) -> float | None:
    """Mean training error over the last `tail` of the logged iterations (the end of the thin curve)."""
    points = curve(metrics, "train")
    if not points:
        return None
    last = points[-1][0]
    window = [e for it, e in points if it >= last * (1 - tail)]
    return statistics.fmean(window)


def pct(x: float | None, spread: float | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f}" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def header(title: str, *, seeds: int, n_runs: int, wall_s: float, notes: list[str], command: str,
           data: str | None = None) -> str:
    m = machine_info()
    lines = [f"# {title}", "",
             f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {m['cpu']}, {m['cores']} cores at {m['mhz']} MHz"
             + (f", GPU {m['gpu']}" if "gpu" in m else ", no GPU"),
             f"- versions: resnet {m['resnet']}, torch {m['torch']}, Python {m['python']}, "
             f"{m.get('torch_threads', '?')} torch threads",
             *([f"- data: {data}"] if data else []),
             f"- seeds: {seeds} per network ({n_runs} trainings); wall time of this command: {wall_s / 60:.1f} min",
             f"- re-run: `{command}` (finished trainings are reused, unfinished ones resume)"]
    if notes:
        lines += ["", "**Reduced settings (`--quick`), not the paper's:**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, or None when the `demo` extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
