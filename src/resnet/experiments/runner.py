"""`resnet reproduce`: train what an experiment needs (resuming or reusing runs), then write its report."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections import defaultdict
from pathlib import Path

from ..artifacts import atomic_write_bytes
from ..models import model_spec
from .plan import RunSpec, Settings, plan_runs, quick_notes
from .report import curve, final_train_err, header, md_table, mean_std, pct, pyplot, read_metrics, save
from .responses import response_stds

SATURATED = 0.01  # a training error this low leaves depth nothing to improve on

TITLES = {
    "degradation": "Degradation: plain against residual networks of growing depth (Sec. 4.2, Fig. 6)",
    "shortcuts": "Shortcut options A, B and C (Sec. 3.3, Table 3), on CIFAR",
    "responses": "Layer responses: std of every 3x3 layer's output (Sec. 4.2, Fig. 7)",
    "table6": "CIFAR-10 error of the ResNets of Table 6",
}


def train_runs(runs: list[RunSpec], runs_dir: Path) -> dict[str, dict] | None:
    """Train (or resume, or reuse) every run; returns each run's summary, or None when a training was
    stopped (SIGTERM/SIGINT): the experiment stops there, and is not analysed with a half-trained network."""
    from ..train import load_recipe, train

    summaries = {}
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}: resnet train --recipe {run.recipe} "
              + " ".join(run.all_overrides()), flush=True)
        cfg = load_recipe(run.recipe, run.all_overrides())
        summaries[run.name] = train(cfg, runs_dir / run.name)
        if summaries[run.name].get("status") != "finished":
            return None
    return summaries


def _command(experiment: str, s: Settings, out: Path | None) -> str:
    """The command that re-runs this experiment into the same folders (`out` None: the default layout)."""
    parts = ["resnet", "reproduce", experiment] + (["--out", str(out)] if out is not None else [])
    if s.quick:
        parts.append("--quick")
    if s.data:
        parts += ["--data", s.data]
    if s.seeds != 1:
        parts += ["--seeds", str(s.seeds)]
    if s.depths:
        parts += ["--depths", ",".join(map(str, s.depths))]
    if s.max_iters:
        parts += ["--iters", str(s.max_iters)]
    return shlex.join(parts)


def reproduce(experiment: str, out_dir: str | Path, settings: Settings, runs_dir: str | Path | None = None) -> dict:
    """Run `experiment`, writing report.md, results.json and plots into `out_dir`.

    Trainings go to `runs_dir` (default out_dir/runs); experiments that share it share their trainings
    (degradation and responses need the same networks), since a finished run with the same config is reused.
    """
    out = Path(out_dir)
    default_layout = runs_dir is not None  # the command's shared runs/reproduce*/trainings, no --out
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    runs = plan_runs(experiment, settings)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries = train_runs(runs, runs_dir)
    if summaries is None:
        return {"experiment": experiment, "status": "interrupted", "report": None}
    analyse = {"degradation": _degradation, "shortcuts": _shortcuts, "responses": _responses,
               "table6": _table6}[experiment]
    body, results = analyse(runs, summaries, runs_dir, out, settings)
    wall = time.perf_counter() - t0
    head = header(TITLES[experiment], seeds=settings.seeds, n_runs=len(runs), wall_s=wall,
                  notes=quick_notes(settings), data=_data_line(settings, runs),
                  command=_command(experiment, settings, None if default_layout else out))
    commands = "\n".join(f"resnet train --recipe {r.recipe} --out {runs_dir / r.name} "
                         + " ".join(shlex.quote(o) for o in r.all_overrides()) for r in runs)
    report = f"{head}\n{body}\n## Every training, as a command\n\n```sh\n{commands}\n```\n"
    atomic_write_bytes(out / "report.md", report.encode())
    results.update({"experiment": experiment, "quick": settings.quick, "data": settings.data or
                    ("digits" if settings.quick else "cifar10"), "seeds": settings.seeds, "wall_s": wall,
                    "report": str(out / "report.md")})
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    return results


def _data_line(s: Settings, runs: list[RunSpec]) -> str:
    """What the networks were trained and scored on, for the report's header."""
    from ..train import load_recipe

    data = s.data or ("digits" if s.quick else "cifar10")
    val_size = load_recipe(runs[0].recipe, runs[0].all_overrides()).val_size if runs else None
    return data + (f"; {val_size} of its training images held out as the validation split" if val_size else "")


# --- degradation -------------------------------------------------------------------------------------

def _per_net(runs: list[RunSpec], summaries: dict, runs_dir: Path) -> dict[str, dict]:
    """Per network (over seeds): final training error, val/test error, params, curves of seed 0."""
    groups: dict[str, list[RunSpec]] = defaultdict(list)
    for r in runs:
        groups[r.arch + (f"-{r.shortcut}" if r.shortcut else "")].append(r)
    nets = {}
    for key, rs in groups.items():
        metrics = [read_metrics(runs_dir / r.name) for r in rs]
        train_err = mean_std([final_train_err(m) for m in metrics])
        val = mean_std([summaries[r.name].get("val_top1_err") for r in rs])
        test = mean_std([summaries[r.name].get("test_top1_err") for r in rs])
        nets[key] = {"arch": rs[0].arch, "depth": rs[0].tags["depth"], "plain": rs[0].tags["plain"],
                     "shortcut": rs[0].shortcut, "train_err": train_err[0], "train_err_std": train_err[1],
                     "val_err": val[0], "val_err_std": val[1], "test_err": test[0], "test_err_std": test[1],
                     "test_err_min": _least(summaries, rs, "test_top1_err"),
                     "val_err_min": _least(summaries, rs, "val_top1_err"),
                     "params": _params(runs_dir / rs[0].name),
                     "train_curve": curve(metrics[0], "train"), "val_curve": curve(metrics[0], "val")}
    return nets


def _least(summaries: dict, rs: list[RunSpec], key: str) -> float | None:
    return min((summaries[r.name][key] for r in rs if summaries[r.name].get(key) is not None), default=None)


def _without_curves(nets: dict[str, dict]) -> dict[str, dict]:
    """The per-network figures for results.json; the curves stay in each run's metrics.jsonl."""
    return {k: {kk: vv for kk, vv in v.items() if not kk.endswith("_curve")} for k, v in nets.items()}


def _params(run_dir: Path) -> int | None:
    """Parameter count of the trained network, from the options saved in its model.json."""
    from ..complexity import model_cost

    path = run_dir / "model.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    return model_cost(meta["arch"], **meta["options"])["params"]


def _headline(nets: dict, plain: bool) -> dict:
    """Does training error rise (plain) / not rise (residual) from the shallowest to the deepest net?"""
    chosen = sorted((n for n in nets.values() if n["plain"] == plain and n["train_err"] is not None),
                    key=lambda n: n["depth"])
    if len(chosen) < 2:
        return {"shown": None}
    lo, hi = chosen[0], chosen[-1]
    shown = hi["train_err"] > lo["train_err"] if plain else hi["train_err"] <= lo["train_err"]
    return {"shown": shown, "shallow": lo["arch"], "deep": hi["arch"], "shallow_err": lo["train_err"],
            "deep_err": hi["train_err"]}


def _plot_degradation(nets: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, plain in zip(axes, (True, False), strict=True):
        chosen = sorted((n for n in nets.values() if n["plain"] == plain), key=lambda n: n["depth"])
        for i, n in enumerate(chosen):
            color = f"C{i}"
            if n["train_curve"]:
                ax.plot(*zip(*n["train_curve"], strict=True), lw=0.8, color=color, alpha=0.8)
            if n["val_curve"]:
                ax.plot(*zip(*n["val_curve"], strict=True), lw=2.4, color=color, label=n["arch"])
        ax.set_title(("plain" if plain else "ResNet") + " (thin: training error, bold: validation error)",
                     fontsize=9)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("top-1 error (%)")
    axes[0].yaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:g}"))
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return True


def _paper_figures_apply(s: Settings) -> bool:
    """Whether the paper's CIFAR-10 errors belong beside these results: full runs on CIFAR-10, named or a
    folder named like it (the JPEG copy in ImageFolder layout), never CIFAR-100 or another folder."""
    if s.quick:
        return False
    return s.data is None or re.fullmatch(r"cifar-?10([-_].*)?", Path(str(s.data)).name.lower()) is not None


def _degradation(runs, summaries, runs_dir: Path, out: Path, s: Settings) -> tuple[str, dict]:
    nets = _per_net(runs, summaries, runs_dir)
    plotted = _plot_degradation(nets, out / "degradation.png")
    rows = []
    for n in sorted(nets.values(), key=lambda n: (not n["plain"], n["depth"])):
        paper = model_spec(n["arch"]).paper.get("top1_err")
        rows.append([n["arch"], n["depth"], pct(n["train_err"], n["train_err_std"]),
                     pct(n["val_err"], n["val_err_std"]), pct(n["test_err"], n["test_err_std"]),
                     f"{paper:.2f}" if paper and _paper_figures_apply(s) else "–"])
    plain, residual = _headline(nets, True), _headline(nets, False)

    def say(h: dict, plain: bool) -> str:
        if h["shown"] is None:
            return "needs two depths"
        verb = "higher" if h["deep_err"] > h["shallow_err"] else "lower or equal"
        outcome = "appeared" if h["shown"] else "did not appear"
        text = (f"{h['deep']} ends with {verb} training error than {h['shallow']} ({pct(h['deep_err'])}% vs "
                f"{pct(h['shallow_err'])}%): the paper's direction **{outcome}**")
        if not plain and not h["shown"] and h["shallow_err"] < SATURATED:
            text += (f"; the shallowest ResNet already trains to under {100 * SATURATED:g}% error here, so "
                     f"this data cannot show a gain from depth, only whether depth hurts")
        return text

    body = ["## Result", "",
            f"- plain nets: {say(plain, True)} (the paper: deeper plain nets have *higher* training error).",
            f"- ResNets: {say(residual, False)} (the paper: deeper ResNets have *lower* training error).", "",
            md_table(["network", "depth", "final training error (%)", "val error (%)", "test error (%)",
                      "paper test error (%, Table 6)"], rows), "",
            "Final training error: mean of the logged training error (on the training batches as the network "
            "saw them, augmented where the recipe augments, as in the "
            "paper's curves) over the last 20% of iterations.", ""]
    if plotted:
        body += ["![training and validation error against iterations](degradation.png)", ""]
    results = {"nets": _without_curves(nets),
               "headline": {"plain": plain, "residual": residual}}
    return "\n".join(body), results


# --- shortcuts ---------------------------------------------------------------------------------------

def _shortcuts(runs, summaries, runs_dir: Path, out: Path, s: Settings) -> tuple[str, dict]:
    nets = _per_net(runs, summaries, runs_dir)
    rows = [[n["arch"], n["shortcut"], f"{n['params']:,}" if n["params"] else "–",
             pct(n["train_err"], n["train_err_std"]), pct(n["val_err"], n["val_err_std"]),
             pct(n["test_err"], n["test_err_std"])]
            for n in sorted(nets.values(), key=lambda n: (n["depth"], n["shortcut"]))]
    paper = md_table(["ResNet-34 on ImageNet (Table 3, 10-crop)", "top-1 err (%)", "top-5 err (%)"],
                     [["A (zero-padding)", 25.03, 7.76], ["B (projection where shapes change)", 24.52, 7.46],
                      ["C (all projections)", 24.19, 7.40]])
    body = ["## Result", "", md_table(["network", "shortcut", "params", "final training error (%)",
                                       "val error (%)", "test error (%)"], rows), "",
            "The paper's figures (ImageNet; the question is the same: do projections matter?):", "", paper, "",
            "The paper concludes the differences are small, so projections are not essential to the "
            "degradation fix; B is its ImageNet default and A its CIFAR default.", ""]
    return "\n".join(body), {"nets": _without_curves(nets)}


# --- responses ---------------------------------------------------------------------------------------

def _response_batches(run_dir: Path, meta: dict, batch_size: int = 256):
    """(split name, batches) for the layer responses: the test split, where CIFAR-10's figures are measured,
    or the held-out validation split when the data has no test split."""
    import yaml

    from ..data import load_dataset, make_loader

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ds = load_dataset(cfg["data"], data_dir=cfg.get("data_dir"), cache_dir=cfg.get("cache_dir"),
                      in_chans=cfg["in_chans"], val_size=cfg.get("val_size"), seed=cfg.get("data_seed", 0))
    name = "test" if "test" in ds.splits else "val"
    loader = make_loader(ds.splits[name], batch_size, train=False, augment="none", mean=meta["mean"],
                         std=meta["std"], eval_view=cfg.get("eval_view"))
    return name, loader.iter_epoch(0)


def _responses(runs, summaries, runs_dir: Path, out: Path, s: Settings) -> tuple[str, dict]:
    from ..loading import load_model

    stds: dict[str, list[float]] = {}
    splits = set()
    for r in runs:
        if r.seed != 0:
            continue
        model, meta = load_model(runs_dir / r.name)
        split, batches = _response_batches(runs_dir / r.name, meta)
        splits.add(split)
        stds[r.arch] = [v for _, v in response_stds(model, batches)]
    order = sorted(stds, key=lambda a: (model_spec(a).depth, a.startswith("resnet")))
    rows = []
    for arch in order:
        v = stds[arch]
        rows.append([arch, len(v), f"{sum(v) / len(v):.3f}", f"{max(v):.3f}", f"{sorted(v)[len(v) // 2]:.3f}"])
    pairs = []
    for arch in order:
        if arch.startswith("plain") and arch.replace("plain", "resnet") in stds:
            res = stds[arch.replace("plain", "resnet")]
            pairs.append({"depth": model_spec(arch).depth, "plain_mean": sum(stds[arch]) / len(stds[arch]),
                          "resnet_mean": sum(res) / len(res)})
    smaller = [p["resnet_mean"] < p["plain_mean"] for p in pairs]
    res_means = [(model_spec(a).depth, sum(v) / len(v)) for a, v in stds.items() if a.startswith("resnet")]
    res_means.sort()
    deeper_smaller = len(res_means) > 1 and res_means[-1][1] < res_means[0][1]
    plotted = _plot_responses(stds, order, out / "responses.png")
    verdict = ("appeared at every depth" if smaller and all(smaller) else
               "appeared at some depths" if any(smaller) else "did not appear")
    body = ["## Result", "",
            f"- The paper (Fig. 7): ResNets' responses are generally smaller than their plain counterparts', "
            f"and deeper ResNets have smaller responses. Here the first part **{verdict}** "
            + "(" + "; ".join(f"depth {p['depth']}: ResNet {p['resnet_mean']:.3f} vs plain {p['plain_mean']:.3f}"
                              for p in pairs) + "). The second part "
            + ("**appeared**" if deeper_smaller else "**did not appear**" if len(res_means) > 1 else "needs two depths")
            + (" (" + ", ".join(f"ResNet-{d}: {m:.3f}" for d, m in res_means) + ")." if len(res_means) > 1 else "."),
            "",
            md_table(["network", "3x3 layers", "mean std", "max std", "median std"], rows), "",
            "Response: the output of each 3x3 layer after its BN, before ReLU and addition, on the "
            + " and ".join(sorted(splits)) + " split; std over every element (images, channels, positions)"
            + (" of seed 0's networks." if s.seeds > 1 else "."), ""]
    if plotted:
        body += ["![std of layer responses, by layer index (top) and sorted by magnitude (bottom)](responses.png)", ""]
    return "\n".join(body), {"stds": stds, "pairs": pairs, "resnet_means_by_depth": res_means,
                              "split": " and ".join(sorted(splits))}


def _plot_responses(stds: dict[str, list[float]], order: list[str], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120)
    for arch in order:
        style = "--" if arch.startswith("plain") else "-"
        color = f"C{sorted({model_spec(a).depth for a in order}).index(model_spec(arch).depth)}"
        v = stds[arch]
        top.plot(range(1, len(v) + 1), v, style, color=color, lw=1.2, label=arch)
        bottom.plot(range(1, len(v) + 1), sorted(v, reverse=True), style, color=color, lw=1.2, label=arch)
    top.set_xlabel("layer index (original order)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std of response")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return True


# --- table 6 -----------------------------------------------------------------------------------------

def _table6(runs, summaries, runs_dir: Path, out: Path, s: Settings) -> tuple[str, dict]:
    nets = _per_net(runs, summaries, runs_dir)
    cifar10 = _paper_figures_apply(s)
    has_test = any(n["test_err"] is not None for n in nets.values())
    split = "test" if has_test else "val"
    rows = []
    for n in sorted(nets.values(), key=lambda n: n["depth"]):
        spec = model_spec(n["arch"])
        best = n["test_err_min"] if has_test else n["val_err_min"]
        mean, spread = (n["test_err"], n["test_err_std"]) if has_test else (n["val_err"], n["val_err_std"])
        paper = spec.paper.get("top1_err")
        paper_err = f"{paper:.2f}" + (" (6.61 ± 0.16)" if spec.depth == 110 else "") if cifar10 else "–"
        rows.append([n["arch"], f"{n['params']:,}" if n["params"] else "–", f"{spec.paper['params'] / 1e6:.2f}M",
                     pct(best), pct(mean, spread), paper_err])
    depths = {n["depth"] for n in nets.values()}
    body = ["## Result", "",
            md_table(["network", "params", "paper params", f"best {split} error (%)", f"mean {split} error (%)",
                      "paper test error (%)"], rows), "",
            "The paper's Table 6 gives one run per depth, and for ResNet-110 the best of 5 runs with their mean "
            f"± std; here every depth ran {s.seeds} time(s)."
            + ("" if has_test else " This data source has no test split, so the validation error of networks "
               "trained on the remaining training images is shown beside the paper's test error of networks "
               "trained on all 50k: compare like with like.")
            + ("" if cifar10 else " The paper's column is CIFAR-10's and is left out for this data.")
            + ("" if 1202 in depths else " ResNet-1202 (7.93% in the paper) is not in this run; add it with "
               "`--depths 20,32,44,56,110,1202`."), ""]
    return "\n".join(body), {"nets": _without_curves(nets), "split": split}
